"""The one SQL test "this record covers this device": its own single records, and the open
or closed ranges over it. A range never leaves its TAC, so the range half reads only the
TAC's slice of the key index."""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, or_

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
