"""The one SQL test "this record covers this device": its own single records, and the open
or closed ranges over it. A range never leaves its TAC, so the range half reads only the
TAC's slice of the key index. ``covering_any`` and ``records_over``: the same rule for many
devices at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from imeisync.store.models import Record


def covering(key: str) -> ColumnElement[bool]:
    """Records whose keys include ``key`` (a single record of it, or a range over it)."""
    return or_(
        and_(Record.imei_key == key, Record.imei_key_last.is_(None)),
        and_(
            Record.imei_key.between(key[:8] + "000000", key),
            Record.imei_key_last.is_not(None),
            Record.imei_key_last >= key,
        ),
    )


def covering_any(keys: Iterable[str], ranged: Iterable[str] | None = None
                 ) -> ColumnElement[bool]:
    """Records whose keys include at least one of ``keys`` (the batched ``covering``: single
    records by one ``IN``, ranges by one slice per TAC). ``ranged``: the keys that may lie in a
    range (default: all of them) -- a TAC's slice of the key index can hold many thousand
    singles, so a caller that knows (the attach index does) spares those reads. Which key a
    range row covers is the caller's to read: ``imei_key <= key <= imei_key_last``."""
    keys = sorted(set(keys))
    span: dict[str, tuple[str, str]] = {}
    for key in sorted(set(ranged)) if ranged is not None else keys:
        low = span.get(key[:8], (key, key))[0]  # sorted: a TAC's first key is its lowest
        span[key[:8]] = (low, key)
    return or_(
        and_(Record.imei_key.in_(keys), Record.imei_key_last.is_(None)),
        *(and_(Record.imei_key.between(tac + "000000", high),
               Record.imei_key_last.is_not(None), Record.imei_key_last >= low)
          for tac, (low, high) in span.items()),
    )


_CHUNK = 500  # devices per query


def records_over(session: Session, keys: Sequence[str], columns: Sequence[Any],
                 *where: ColumnElement[bool], ranged: Iterable[str] | None = None
                 ) -> dict[str, list[Any]]:
    """For each of ``keys``, the records matching ``where`` that cover it, in id order: its
    single records and the ranges over it (for the ``ranged`` keys only, when given; see
    ``covering_any``). Rows carry ``columns`` plus ``imei_key`` and ``imei_key_last``."""
    found: dict[str, list[Any]] = {key: [] for key in keys}
    keys = list(found)  # each once
    near = set(ranged) if ranged is not None else None
    cols = (*columns, Record.imei_key, Record.imei_key_last)
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start:start + _CHUNK]
        rows = session.execute(select(*cols).where(
            covering_any(chunk, chunk if near is None else [k for k in chunk if k in near]),
            *where).order_by(Record.id)).all()
        for row in rows:
            if row.imei_key_last is None:
                found[row.imei_key].append(row)
                continue
            for key in chunk:
                if row.imei_key <= key <= row.imei_key_last:
                    found[key].append(row)
    return found
