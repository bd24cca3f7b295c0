"""Range records at the registry: reading the open ranges of a TAC and the one decision a
range change needs beyond ``decide_removal`` (which still decides ownership).

A range stays inside one TAC, so the open ranges that can touch a change are those of its TAC.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from imeisync.registry.models import RegistryRecord

# The largest range the reference registry takes (GSMA-style 0011 above it): the members'
# default [police] max_range.
MAX_RANGE = 100_000


def open_ranges(conn: Connection, tacs: Iterable[str]) -> dict[str, list[Any]]:
    """Open range records per TAC: (id, imei_key, imei_key_last, owner_id, owner_country,
    kind) rows."""
    found: dict[str, list[Any]] = {}
    for tac in sorted(set(tacs)):
        found[tac] = list(conn.execute(
            select(RegistryRecord.id, RegistryRecord.imei_key, RegistryRecord.imei_key_last,
                   RegistryRecord.owner_id, RegistryRecord.owner_country, RegistryRecord.kind)
            .where(RegistryRecord.imei_key.between(tac + "000000", tac + "999999"),
                   RegistryRecord.imei_key_last.is_not(None),
                   RegistryRecord.closed_seq.is_(None))
        ))
    return found


def own_single_inside(conn: Connection, owner_id: str, first: str, last: str) -> str | None:
    """The key of an open single record of ``owner_id`` inside ``first..last``, if any."""
    return conn.execute(
        select(RegistryRecord.imei_key).where(
            RegistryRecord.imei_key.between(first, last),
            RegistryRecord.imei_key_last.is_(None), RegistryRecord.owner_id == owner_id,
            RegistryRecord.closed_seq.is_(None)).limit(1)
    ).scalar()
