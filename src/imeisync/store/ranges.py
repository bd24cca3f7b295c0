"""The one SQL test "this record covers this device": its own single records, and the open
or closed ranges over it. A range never leaves its TAC, so the range half reads only the
TAC's slice of the key index. ``covering_each`` is the same rule for many devices at once.
"""

from __future__ import annotations

from collections.abc import Sequence
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
