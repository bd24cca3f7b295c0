"""Canary records: each member's own small set of synthetic blocking records, so that a leaked
copy of a member's list names the member it came from (issue 15; GDPR Art. 5(1)(b)).

How a canary is made. Each member's key is ``HMAC-SHA256(canary secret, member id)``: one
secret to keep (``[canary] secret_file``), nothing per member to store or rotate, and any key
can be recomputed to prove a canary was drawn for that member (``identify`` does). Draw ``n``
is ``HMAC(member key, n)``; its bytes pick a TAC of ``[canary] tacs`` and a serial (the IMEI:
TAC + serial + its Luhn digit), and a second HMAC the owner it claims, the reason (stolen,
lost, fraud, in the proportions of real reports), a date one to six years back and a change id
in the owners' own ``owner:uuid4-hex`` form. A draw whose key is taken (another member's
canary, any record the registry holds) is skipped, so each canary names exactly one member.

Whose record it claims to be. A canary claims a real member as owner, drawn among the members
whose records the recipient receives (never itself): an owner of its own ("registry",
"canary") would mark every canary at a glance. The claimed owner never learns of it: canaries
live in ``registry_canaries``, not ``registry_records``, so no member's insert, remove or
dispute meets them and no member can lift one (a remove by the claimed owner is ``0003``, as
for any record it does not have). A dispute filed about a canary is accepted as usual but
never delivered, and logged: someone is asking about a record only one member received.

How they enter the feed. Each canary is an ordinary ``change`` insert in ``registry_feed``
with ``audience`` = the recipient (other members never see it), at the position where it was
planted; the snapshot merges the recipient's canaries into its stream at the same position.
So a member that pulls and one that snapshots end with the same canaries, reconcile finds
nothing to repair, and the daemon's shrink guard never sees them go.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from imeisync.domain.errors import NotFound
from imeisync.domain.imei import format as imei_format
from imeisync.domain.imei import parse_lookup
from imeisync.domain.times import rfc3339_micro
from imeisync.registry.canary_config import CanaryConfig
from imeisync.registry.config import Member, RegistryConfig
from imeisync.registry.models import FeedEntry, RegistryCanary, RegistryRecord
from imeisync.store.db import Database

log = logging.getLogger("imeisync.registry")

_YEAR_US = 365 * 24 * 3600 * 1_000_000
_MAX_SKIPS = 1000  # taken draws tolerated per member before giving up (tiny TAC sets)
# (reason, share out of 256): stolen most often, as in the registry's real reports
_REASONS = (("stolen", 154), ("lost", 230), ("fraud", 256))


def member_key(secret: bytes, member_id: str) -> bytes:
    """The member's canary key: derived, never stored."""
    return hmac.digest(secret, b"imeisync-canary-v1\x00" + member_id.encode(), hashlib.sha256)


def _draw_bytes(key: bytes, label: bytes, n: int) -> bytes:
    return hmac.digest(key, label + n.to_bytes(8, "big"), hashlib.sha256)


def draw_key(key: bytes, tacs: tuple[str, ...], n: int) -> str:
    """The 14-digit IMEI key of draw ``n``: a TAC of ``tacs`` and a serial."""
    d = _draw_bytes(key, b"imei\x00", n)
    return tacs[int.from_bytes(d[:8], "big") % len(tacs)] + _serial(d)


def _serial(d: bytes) -> str:
    return f"{int.from_bytes(d[8:16], 'big') % 1_000_000:06d}"


@dataclass(frozen=True)
class Canary:
    imei_key: str
    recipient_id: str
    draw: int
    owner_id: str
    owner_country: str
    reason: str
    at: str
    change_id: str
    kind: str = "block"


def _make(key: bytes, canary: CanaryConfig, recipient: str, owners: list[Member], n: int,
          now: datetime) -> Canary:
    """Draw ``n`` for ``recipient``; ``owners`` are the members it may claim (sorted)."""
    d = _draw_bytes(key, b"meta\x00", n)
    owner = owners[int.from_bytes(d[:8], "big") % len(owners)]
    reason = next(r for r, share in _REASONS if d[8] < share)
    back = _YEAR_US + int.from_bytes(d[9:17], "big") % (5 * _YEAR_US)
    at = rfc3339_micro(now - timedelta(microseconds=back))
    change_id = f"{owner.id}:{uuid.UUID(bytes=d[16:32], version=4).hex}"
    return Canary(draw_key(key, canary.tacs, n), recipient, n, owner.id, owner.country, reason,
                  at, change_id)


def possible_owners(config: RegistryConfig, recipient: Member) -> list[Member]:
    """The members whose records ``recipient`` receives, itself excepted: whom a canary may
    claim without standing out of the recipient's list."""
    return sorted((m for m in config.members.values()
                   if m.id != recipient.id and recipient.receives_from(m.id, m.country)),
                  key=lambda m: m.id)


def plant(db: Database, config: RegistryConfig, now: datetime) -> dict[str, int]:
    """Give every member its ``per_member`` canaries (those it lacks); {member: planted}.

    Idempotent and safe from several processes: it runs under the registry's write lock and
    first looks at what is planted. The canaries of a member enter the feed together, at the
    position where they are planted, for that member only.
    """
    canary = config.canary
    if canary is None:
        return {}
    planted: dict[str, int] = {}
    stamp = rfc3339_micro(now)
    with db.write() as session:
        conn = session.connection()
        for member in config.members.values():
            owners = possible_owners(config, member)
            if not owners:
                log.warning("canaries: %s receives no other member's records; none planted",
                            member.id)
                continue
            rows = conn.execute(select(RegistryCanary.imei_key, RegistryCanary.draw).where(
                RegistryCanary.recipient_id == member.id)).all()
            current = [r for r in rows if r.imei_key[:8] in canary.tacs]
            need = canary.per_member - len(current)
            if need <= 0:
                continue
            key = member_key(canary.secret, member.id)
            n = max((r.draw for r in rows), default=-1) + 1
            new: list[Canary] = []
            skips = 0
            while len(new) < need and skips <= _MAX_SKIPS:
                drawn = _make(key, canary, member.id, owners, n, now)
                n += 1
                if any(c.imei_key == drawn.imei_key for c in new) or _taken(conn,
                                                                           drawn.imei_key):
                    skips += 1
                    continue
                new.append(drawn)
            if len(new) < need:
                log.error("canaries: could not draw %d canaries for %s from %d TAC(s); add "
                          "[canary] tacs", need, member.id, len(canary.tacs))
            _insert(conn, new, stamp)
            planted[member.id] = len(new)
    if planted:
        log.info("canaries planted: %s", ", ".join(f"{m} {k}" for m, k in planted.items()))
    return planted


def _taken(conn: Connection, imei_key: str) -> bool:
    return (conn.execute(select(RegistryCanary.imei_key).where(
                RegistryCanary.imei_key == imei_key)).first() is not None
            or conn.execute(select(RegistryRecord.id).where(
                RegistryRecord.imei_key == imei_key).limit(1)).first() is not None)


def _insert(conn: Connection, canaries: list[Canary], stamp: str) -> None:
    if not canaries:
        return
    seqs = list(conn.execute(
        insert(FeedEntry).returning(FeedEntry.seq, sort_by_parameter_order=True),
        [{"type": "change", "imei_key": c.imei_key, "imei_key_last": None,
          "owner_id": c.owner_id, "owner_country": c.owner_country, "change_id": c.change_id,
          "action": "insert", "kind": c.kind, "reason": c.reason, "at": c.at,
          "received_at": stamp, "audience": c.recipient_id, "dispute_id": None}
         for c in canaries]).scalars())
    conn.execute(insert(RegistryCanary), [
        {"imei_key": c.imei_key, "recipient_id": c.recipient_id, "draw": c.draw,
         "owner_id": c.owner_id, "owner_country": c.owner_country, "kind": c.kind,
         "reason": c.reason, "at": c.at, "change_id": c.change_id, "seq": seq,
         "planted_at": stamp} for c, seq in zip(canaries, seqs, strict=True)])


# -- the snapshot ---------------------------------------------------------------------------

SnapshotLine = tuple[str, str, str, str, str, int, str, str]


def snapshot_lines(conn: Connection, member: Member, at_seq: int) -> list[SnapshotLine]:
    """``member``'s canaries as snapshot rows (the record columns), in (imei, owner) order:
    those planted at or before the snapshot's position, of owners it still receives."""
    rows = conn.execute(select(RegistryCanary).where(
        RegistryCanary.recipient_id == member.id, RegistryCanary.seq <= at_seq)).all()
    return sorted((c.imei_key, c.owner_id, c.owner_country, c.kind, c.reason, c.seq, c.at, "")
                  for c in rows if member.receives_from(c.owner_id, c.owner_country))


def merge(rows: Iterable[Any], pending: list[SnapshotLine]) -> list[Any]:
    """The snapshot rows of one chunk with the canaries that sort within it, in (imei, owner)
    order; the canaries used are taken off ``pending``. A record the claimed owner really
    holds for the same device wins over the canary (the pair must stay unique)."""
    rows = list(rows)
    if not rows or not pending:
        return rows
    last = (rows[-1][0], rows[-1][1])
    cut = bisect.bisect_right([(p[0], p[1]) for p in pending], last)
    if not cut:
        return rows
    real = {(r[0], r[1]) for r in rows}
    mine = [p for p in pending[:cut] if (p[0], p[1]) not in real]
    del pending[:cut]
    return sorted(rows + mine, key=lambda r: (r[0], r[1]))


# -- asking about a canary ------------------------------------------------------------------


def find(conn: Connection, imei_key: str) -> Any:
    """The canary row planted under ``imei_key``, or None."""
    return conn.execute(select(RegistryCanary).where(
        RegistryCanary.imei_key == imei_key)).first()


def is_canary_change(conn: Connection, change_id: str) -> bool:
    return conn.execute(select(RegistryCanary.imei_key).where(
        RegistryCanary.change_id == change_id)).first() is not None


def verified(canary: CanaryConfig | None, row: Any) -> bool:
    """Whether the canary's serial is that of draw ``row.draw`` of its recipient's key: proof,
    with the secret, that it was drawn for that member (a chance of one in a million for any
    other number). The serial alone is checked, so it holds after ``tacs`` changed."""
    if canary is None or not canary.secret:
        return False
    d = _draw_bytes(member_key(canary.secret, row.recipient_id), b"imei\x00", row.draw)
    return _serial(d) == str(row.imei_key)[8:]


def identify(db: Database, config: RegistryConfig, text: str) -> dict[str, Any]:
    """Which member received the canary ``text`` (an IMEI as a person or a log gives it).

    Raises ``BadInput`` for a malformed IMEI, ``NotFound`` for a device that is no canary.
    """
    device = parse_lookup(text)
    with db.read() as session:
        row = find(session.connection(), device.key)
    if row is None:
        raise NotFound(f"IMEI {imei_format(device.full)} is not a canary of this registry",
                       "only numbers drawn from [canary] tacs for a member are", code="no_canary")
    member = config.members.get(row.recipient_id)
    return {"imei": device.full, "imei_key": row.imei_key, "member": row.recipient_id,
            "country": member.country if member else None, "claimed_owner": row.owner_id,
            "planted_at": row.planted_at, "seq": row.seq, "draw": row.draw,
            "verified": verified(config.canary, row)}
