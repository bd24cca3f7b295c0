"""The one SQL test "this record covers this device": its own single records, and the open
or closed ranges over it. A range never leaves its TAC, so the range half reads only the
TAC's slice of the key index. ``covering_each`` is the same rule for many devices at once.
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


_CHUNK = 500


def covering_each(session: Session, keys: Sequence[str], columns: Sequence[Any],
                  *where: ColumnElement[bool]) -> dict[str, Any]:
    """For each of ``keys``, the first record (by id) matching ``where`` that covers it: a
    single record of it (looked up by key, in chunks), else a range over it (read per TAC).
    Rows carry ``columns`` plus ``imei_key`` and ``imei_key_last``."""
    cols = (*columns, Record.id, Record.imei_key, Record.imei_key_last)
    found: dict[str, Any] = {}
    for start in range(0, len(keys), _CHUNK):
        for row in session.execute(select(*cols).where(
                Record.imei_key.in_(keys[start : start + _CHUNK]),
                Record.imei_key_last.is_(None), *where).order_by(Record.id)):
            found.setdefault(row.imei_key, row)
    by_tac: dict[str, list[str]] = {}
    for key in keys:
        if key not in found:
            by_tac.setdefault(key[:8], []).append(key)
    for tac, missing in by_tac.items():
        ranges = session.execute(select(*cols).where(
            Record.imei_key.between(tac + "000000", tac + "999999"),
            Record.imei_key_last.is_not(None), *where).order_by(Record.id)).all()
        for key in missing:
            record = next((r for r in ranges if r.imei_key <= key <= r.imei_key_last), None)
            if record is not None:
                found[key] = record
    return found
