"""Sightings between members at the registry (``POST /v1/sightings``): a member saw on its
network a device another member tracks, and says so — IMEI key, when, nothing else.

The reporter is the member whose key signed the request, never a field of the body. A notice
is accepted only while a ``track`` record of another member is open for the device (a single
record or a range over it) and the reporter's receive profile covers that record — so that the
answer never tells a member of a record it was not sent; each such owner gets one
``sighting`` feed entry, addressed to it alone (``audience``), carrying the key, the reporter
and its country and the time: no subscriber identity and no network node, which the notice
cannot even carry (any field but ``notice_id``, ``imei``, ``seen_at`` is refused). Snapshots
are built from records, so they never carry sightings.

Idempotent by (reporter, ``notice_id``) as changes are by ``change_id``: a resent notice gets
the first answer and never a second feed entry; the same id with another content is refused.

A notice gets its own route rather than riding in ``POST /v1/changes``: a change is about the
sender's own record under the ownership rule, a sighting about somebody else's; its fields,
its answers and its retries (the daemon keeps pending notices apart from the outbox) differ,
and a registry that does not know sightings answers 404 here instead of 0011 for a whole
batch of changes.

Codes, per notice: ``0003`` no open track record of another member that the reporter receives,
``0011`` a malformed field, ``0013`` the only open track record is the reporter's own (its own
sightings stay at home), ``0014`` ``seen_at`` in the future (beyond ``FUTURE_SKEW``) or older
than ``MAX_AGE``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from imeisync.domain.errors import BadInput
from imeisync.domain.imei import is_key
from imeisync.domain.orders import parse_timestamp
from imeisync.domain.ranges import overlaps
from imeisync.domain.times import rfc3339_micro
from imeisync.registry import batches
from imeisync.registry.codes import MALFORMED, NO_RECORD, OWN_RECORD, SEEN_AT_OUT_OF_RANGE
from imeisync.registry.config import Member
from imeisync.registry.models import FeedEntry, RegistryRecord, RegistrySighting
from imeisync.registry.ranges import open_ranges
from imeisync.store.db import Database

MAX_SIGHTINGS = 1000
_CHUNK = 500
FUTURE_SKEW = timedelta(minutes=5)  # the signatures' own freshness window
MAX_AGE = timedelta(days=7)  # older news of a tracked phone is for the police's usual channels
_FIELDS = {"notice_id", "imei", "seen_at"}


def submit(db: Database, clock: Callable[[], datetime], member: Member,
           body: Any) -> dict[str, Any]:
    """Record ``member``'s sighting notices; per-notice results in the order sent."""
    notices = batches.batch_items(body, "sightings", "notice_id", "notice", MAX_SIGHTINGS)
    moment = clock()
    now = rfc3339_micro(moment)
    results: list[dict[str, Any]] = []
    with db.write() as session:
        conn = session.connection()
        ids = [n["notice_id"] for n in notices]
        previous = {row.notice_id: row for row in conn.execute(select(RegistrySighting).where(
            RegistrySighting.reporter_id == member.id, RegistrySighting.notice_id.in_(ids)))}
        tracking = _track_owners(conn, sorted({key for n in notices
                                               if is_key(key := n.get("imei"))}))
        rows, feed = [], []
        for notice in notices:
            result, row, entries = _decide(tracking, member, notice,
                                           previous.get(notice["notice_id"]), moment, now)
            results.append(result)
            if row is not None:
                rows.append(row)
            feed.extend(entries)
        if feed:
            conn.execute(insert(FeedEntry), feed)
        if rows:
            conn.execute(insert(RegistrySighting), rows)
    accepted = sum(1 for r in results if r["result"] == "accepted")
    return {"results": results, "accepted": accepted}


def _decide(tracking: dict[str, dict[str, str]], member: Member, notice: dict[str, Any],
            before: Any, moment: datetime, now: str,
            ) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """(the answer, the row to remember it by or None, the feed entries to write)."""
    notice_id = notice["notice_id"]
    digest = batches.digest(notice)
    result: dict[str, Any] = {"notice_id": notice_id}
    if before is not None:
        result.update(batches.answer_again(before, digest, "notice_id", notice_id, "notice"))
        return result, None, []
    row = {"reporter_id": member.id, "notice_id": notice_id, "digest": digest,
           "imei_key": None, "seen_at": None, "code": None, "message": None, "owners": None,
           "received_at": now}

    def reject(code: str, message: str) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
        result.update(result="rejected", code=code, message=message)
        row.update(result="rejected", code=code, message=message)
        return result, row, []

    problem = _field_problem(notice)
    if problem:
        return reject(MALFORMED, problem)
    key = notice["imei"]
    seen = parse_timestamp(notice["seen_at"], "seen_at")
    row.update(imei_key=key, seen_at=rfc3339_micro(seen))
    if seen > moment + FUTURE_SKEW:
        return reject(SEEN_AT_OUT_OF_RANGE, f"seen_at {notice['seen_at']} is in the future; "
                                            "check the clock")
    if seen < moment - MAX_AGE:
        return reject(SEEN_AT_OUT_OF_RANGE, f"seen_at {notice['seen_at']} is more than "
                                            f"{MAX_AGE.days} days old")
    # Only records the reporter receives: an answer must not tell it of a record it was
    # never sent (a member cannot probe which devices others track outside its profile).
    owners = {o: c for o, c in tracking.get(key, {}).items() if member.receives_from(o, c)}
    others = {o: c for o, c in owners.items() if o != member.id}
    if not others:
        if owners:
            return reject(OWN_RECORD, f"the only open track record for IMEI key {key} is "
                                      f"{member.id}'s own; its sightings stay with it")
        return reject(NO_RECORD, f"no open track record of another member that {member.id} "
                                 f"receives for IMEI key {key}")
    entries = [{"type": "sighting", "imei_key": key, "owner_id": owner,
                "owner_country": country, "at": row["seen_at"], "received_at": now,
                "audience": owner, "reporter_id": member.id,
                "reporter_country": member.country, "notice_id": notice_id}
               for owner, country in sorted(others.items())]
    result["result"] = "accepted"
    row.update(result="accepted", owners=",".join(sorted(others)))
    return result, row, entries


def _field_problem(notice: dict[str, Any]) -> str | None:
    unknown = sorted(set(notice) - _FIELDS)
    if unknown:
        return (f"unknown field(s): {', '.join(u[:32] for u in unknown[:5])}; a sighting "
                "notice carries only notice_id, imei and seen_at")
    if not is_key(notice.get("imei")):
        return f"imei {str(notice.get('imei'))[:20]!r} is not 14 digits (TAC + serial)"
    seen_at = notice.get("seen_at")
    if not isinstance(seen_at, str) or len(seen_at) > 40:
        return "field 'seen_at' is missing or not text"
    try:
        parse_timestamp(seen_at, "seen_at")
    except BadInput:
        return f"seen_at {seen_at!r} is not an RFC 3339 time with a time zone"
    return None


def _track_owners(conn: Connection, keys: list[str]) -> dict[str, dict[str, str]]:
    """Per key, owner -> country of every open track record over it (single or range)."""
    found: dict[str, dict[str, str]] = {}
    for start in range(0, len(keys), _CHUNK):
        for row in conn.execute(
            select(RegistryRecord.imei_key, RegistryRecord.owner_id,
                   RegistryRecord.owner_country).where(
                RegistryRecord.imei_key.in_(keys[start : start + _CHUNK]),
                RegistryRecord.imei_key_last.is_(None), RegistryRecord.closed_seq.is_(None),
                RegistryRecord.kind == "track")):
            found.setdefault(row.imei_key, {})[row.owner_id] = row.owner_country
    ranges = open_ranges(conn, {key[:8] for key in keys})
    for key in keys:
        for r in ranges[key[:8]]:
            if r.kind == "track" and overlaps(key, key, r.imei_key, r.imei_key_last):
                found.setdefault(key, {}).setdefault(r.owner_id, r.owner_country)
    return found
