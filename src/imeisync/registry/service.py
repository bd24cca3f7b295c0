"""What the reference registry does, without HTTP: accept changes, serve the feed and the
snapshot, carry disputes. The HTTP layer (``registry.app``) only verifies signatures and
renders.

The rules are the GSMA IMEI Database's (DOMAIN.md): only the owner removes its record, and
whether it may is decided by ``imeisync.domain.ownership.decide_removal`` — the very function
the daemon's order intake calls — so registry and operators can never disagree on ownership.
Result codes: ``0002`` not the owner, ``0003`` no such record, ``0010`` unknown reason,
``0011`` malformed field, ``0012`` this operator already has an open record for the device
(remove it first; the daemon never sends that, so it means local and central state differ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from imeisync.domain import fields
from imeisync.domain.errors import BadInput
from imeisync.domain.imei import is_key
from imeisync.domain.orders import parse_timestamp
from imeisync.domain.ownership import RemovalOutcome, decide_removal
from imeisync.domain.ranges import describe, overlaps, parse_wire_device, wire_device
from imeisync.domain.times import rfc3339_micro
from imeisync.registry import batches, disputes, sightings
from imeisync.registry.codes import (
    ALREADY_OPEN,
    MALFORMED,
    NO_RECORD,
    NOT_OWNER,
    UNKNOWN_REASON,
)
from imeisync.registry.config import Member, RegistryConfig
from imeisync.registry.models import FeedEntry, RegistryDispute, RegistryRecord, Submission
from imeisync.registry.ranges import MAX_RANGE, open_ranges, own_single_inside
from imeisync.store.db import Database

if TYPE_CHECKING:
    from imeisync.registry.snapshot import Snapshot


MAX_BATCH = 1000
MAX_PAGE = 10000
DEFAULT_PAGE = 1000
KINDS = ("block", "track")

_CHANGE_FIELDS = {"change_id", "action", "imei", "imei_first", "imei_last", "kind", "reason",
                  "at"}
_CHUNK = 500


def rfc3339(moment: datetime) -> str:
    """UTC with microseconds and ``Z``: ``2026-11-21T10:00:00.000000Z``."""
    return rfc3339_micro(moment)


@dataclass
class _Open:
    """An open record during a batch: existing (``id``) or opened by this batch (``new``)."""

    owner_id: str
    owner_country: str
    kind: str
    id: int | None = None
    new: dict[str, Any] | None = None
    key: str = ""
    last: str | None = None  # a range record's last key


@dataclass
class _Batch:
    feed: list[dict[str, Any]] = field(default_factory=list)
    new_records: list[tuple[dict[str, Any], int]] = field(default_factory=list)  # row, feed idx
    closes: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # id, idx, values
    submissions: list[tuple[dict[str, Any], int | None]] = field(default_factory=list)
    answers: list[tuple[str, int]] = field(default_factory=list)  # dispute_id, feed idx
    results: list[dict[str, Any]] = field(default_factory=list)
    result_feed: dict[int, int] = field(default_factory=dict)  # result index -> feed idx
    ranges: dict[str, list[_Open]] = field(default_factory=dict)  # open ranges per TAC
    conn: Any = None


class Registry:
    def __init__(self, db: Database, config: RegistryConfig,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.db = db
        self.config = config
        self.clock = clock

    def member(self, member_id: str) -> Member | None:
        return self.config.members.get(member_id)

    # -- POST /v1/changes ----------------------------------------------------------------

    def submit(self, member: Member, body: Any) -> dict[str, Any]:
        """Apply a batch of ``member``'s changes; per-change results in the order sent."""
        changes = self._batch_shape(body)
        now = rfc3339(self.clock())
        with self.db.write() as session:
            conn = session.connection()
            ids = [c["change_id"] for c in changes]
            previous = self._previous(conn, member.id, ids)
            keys = sorted({key for c in changes
                           if is_key(key := c.get("imei") or c.get("imei_first"))})
            open_by_key = self._open_records(conn, keys)
            disputes = self._open_disputes(conn, keys)
            batch = _Batch(conn=conn)
            for tac, rows in open_ranges(conn, {k[:8] for k in keys}).items():
                batch.ranges[tac] = [_Open(r.owner_id, r.owner_country, r.kind, id=r.id,
                                           key=r.imei_key, last=r.imei_key_last) for r in rows]
            for change in changes:
                self._decide(batch, member, change, previous, open_by_key, disputes, now)
            seqs = self._write(conn, batch, member, now)
        for index, feed_index in batch.result_feed.items():
            batch.results[index]["seq"] = seqs[feed_index]
        accepted = sum(1 for r in batch.results if r["result"] == "accepted")
        return {"results": batch.results, "accepted": accepted}

    @staticmethod
    def _batch_shape(body: Any) -> list[dict[str, Any]]:
        return batches.batch_items(body, "changes", "change_id", "change", MAX_BATCH)

    @staticmethod
    def _previous(conn: Connection, operator_id: str, ids: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for start in range(0, len(ids), _CHUNK):
            rows = conn.execute(
                select(Submission).where(Submission.operator_id == operator_id,
                                         Submission.change_id.in_(ids[start : start + _CHUNK]))
            )
            for row in rows:
                found[row.change_id] = row
        return found

    @staticmethod
    def _open_records(conn: Connection, keys: list[str]) -> dict[str, list[_Open]]:
        found: dict[str, list[_Open]] = {}
        for start in range(0, len(keys), _CHUNK):
            rows = conn.execute(
                select(RegistryRecord.id, RegistryRecord.imei_key, RegistryRecord.owner_id,
                       RegistryRecord.owner_country, RegistryRecord.kind)
                .where(RegistryRecord.imei_key.in_(keys[start : start + _CHUNK]),
                       RegistryRecord.imei_key_last.is_(None),
                       RegistryRecord.closed_seq.is_(None))
            )
            for rid, key, owner, country, kind in rows:
                found.setdefault(key, []).append(_Open(owner, country, kind, id=rid, key=key))
        return found

    @staticmethod
    def _open_disputes(conn: Connection, keys: list[str]) -> dict[tuple[str, str], list[Any]]:
        found: dict[tuple[str, str], list[Any]] = {}
        for start in range(0, len(keys), _CHUNK):
            rows = conn.execute(
                select(RegistryDispute.dispute_id, RegistryDispute.imei_key,
                       RegistryDispute.owner_id, RegistryDispute.owner_country,
                       RegistryDispute.filer_id)
                .where(RegistryDispute.imei_key.in_(keys[start : start + _CHUNK]),
                       RegistryDispute.state == "open")
            )
            for row in rows:
                found.setdefault((row.imei_key, row.owner_id), []).append(row)
        return found

    def _decide(self, batch: _Batch, member: Member, change: dict[str, Any],
                previous: dict[str, Any], open_by_key: dict[str, list[_Open]],
                disputes: dict[tuple[str, str], list[Any]], now: str) -> None:
        change_id = change["change_id"]
        digest = batches.digest(change)
        result: dict[str, Any] = {"change_id": change_id}
        batch.results.append(result)
        before = previous.get(change_id)
        if before is not None:
            result.update(batches.answer_again(before, digest, "change_id", change_id, "change"))
            if result["result"] == "duplicate":
                result["seq"] = before.seq
            return

        def reject(code: str, message: str) -> None:
            result.update(result="rejected", code=code, message=message)
            batch.submissions.append(({"change_id": change_id, "digest": digest,
                                       "result": "rejected", "code": code,
                                       "message": message}, None))

        problem = _field_problem(change)
        if problem:
            reject(MALFORMED, problem)
            return
        action, reason = change["action"], change["reason"]
        key, last = parse_wire_device(change, max_range=MAX_RANGE)
        kind = change.get("kind", "block")
        allowed = fields.OPENING_REASONS if action == "insert" else fields.LIFT_REASONS
        if reason not in allowed:
            reject(UNKNOWN_REASON, f"reason {reason[:32]!r} is not known for {action}; "
                                   f"use one of {', '.join(allowed)}")
            return
        at = rfc3339(parse_timestamp(change["at"], "at"))
        singles = open_by_key.setdefault(key, []) if last is None else []
        in_tac = batch.ranges.setdefault(key[:8], [])
        touching = [r for r in in_tac if overlaps(key, last or key, r.key, r.last or r.key)]
        # What the change is about: a single with the ranges over it, or the very same range.
        open_records = singles + touching if last is None else [
            r for r in touching if r.key == key and r.last == last]
        feed_row = {"type": "change", "imei_key": key, "imei_key_last": last,
                    "owner_id": member.id,
                    "owner_country": member.country, "change_id": change_id, "action": action,
                    "kind": kind, "reason": reason, "at": at, "received_at": now}
        if action == "insert":
            mine = next((r for r in singles + touching if r.owner_id == member.id), None)
            inside = (own_single_inside(batch.conn, member.id, key, last)
                      if mine is None and last is not None else None)
            if mine is not None or inside is not None:
                what = (f"IMEI key {inside}" if inside else
                        f"range {mine.key}..{mine.last}" if mine and mine.last else
                        f"IMEI key {key}")
                reject(ALREADY_OPEN, f"{member.id} already has an open record for {what}; "
                                     "remove it before inserting again")
                return
            feed_index = len(batch.feed)
            batch.feed.append(feed_row)
            row = {"imei_key": key, "imei_key_last": last,
                   "owner_id": member.id, "owner_country": member.country,
                   "kind": kind, "reason": reason, "opened_at": at,
                   "opened_change_id": change_id}
            batch.new_records.append((row, feed_index))
            (singles if last is None else in_tac).append(
                _Open(member.id, member.country, kind, new=row, key=key, last=last))
        else:
            decision = decide_removal(open_records, member.id)
            part_of = next((r for r in touching if r.owner_id == member.id), None)
            if decision.allowed and all(r.last != last for r in decision.own):
                decision = decide_removal([], member.id)  # only a range over the device
            if decision.outcome is RemovalOutcome.NO_RECORD and part_of is not None:
                reject(NO_RECORD, f"{member.id}'s open range "
                                  f"{describe(part_of.key, part_of.last or part_of.key)} covers "
                                  "this; a range is removed whole, by its imei_first/imei_last")
                return
            if decision.outcome is RemovalOutcome.NO_RECORD and last is not None:
                decision = decide_removal(touching, member.id)
            if decision.outcome is RemovalOutcome.NOT_OWNER:
                reject(NOT_OWNER, f"record owned by {decision.owners_text()}, not by "
                                  f"{member.id}; remove request ignored")
                return
            if decision.outcome is RemovalOutcome.NO_RECORD:
                reject(NO_RECORD, f"no open record for IMEI key {key}; nothing to remove")
                return
            feed_index = len(batch.feed)
            feed_row["kind"] = decision.own[0].kind
            batch.feed.append(feed_row)
            values = {"closed_at": at, "closed_change_id": change_id, "close_reason": reason}
            for record in decision.own:
                (singles if record.last is None else in_tac).remove(record)
                if record.new is not None:
                    record.new.update(values, closed_feed=feed_index)
                else:
                    assert record.id is not None
                    batch.closes.append((record.id, feed_index, values))
            for dispute in disputes.pop((key, member.id), []):
                answer_index = len(batch.feed)
                batch.feed.append({
                    "type": "dispute_answer", "imei_key": key, "owner_id": member.id,
                    "owner_country": member.country, "reason": "lifted", "at": now,
                    "received_at": now, "audience": dispute.filer_id,
                    "dispute_id": dispute.dispute_id,
                })
                batch.answers.append((dispute.dispute_id, answer_index))
        result["result"] = "accepted"
        batch.result_feed[len(batch.results) - 1] = feed_index
        batch.submissions.append(({"change_id": change_id, "digest": digest,
                                   "result": "accepted"}, feed_index))

    @staticmethod
    def _write(conn: Connection, batch: _Batch, member: Member, now: str) -> list[int]:
        seqs: list[int] = []
        if batch.feed:
            rows = [{"change_id": None, "action": None, "kind": None, "reason": None,
                     "audience": None, "dispute_id": None, "imei_key_last": None, **row}
                    for row in batch.feed]
            seqs = list(conn.execute(
                insert(FeedEntry).returning(FeedEntry.seq, sort_by_parameter_order=True), rows
            ).scalars())
        if batch.new_records:
            rows = []
            for row, feed_index in batch.new_records:
                closed = row.pop("closed_feed", None)
                rows.append({"closed_seq": None, "closed_at": None, "closed_change_id": None,
                             "close_reason": None, **row, "opened_seq": seqs[feed_index],
                             **({"closed_seq": seqs[closed]} if closed is not None else {})})
            conn.execute(insert(RegistryRecord), rows)
        for record_id, feed_index, values in batch.closes:
            conn.execute(update(RegistryRecord).where(RegistryRecord.id == record_id)
                         .values(**values, closed_seq=seqs[feed_index]))
        for dispute_id, feed_index in batch.answers:
            conn.execute(update(RegistryDispute)
                         .where(RegistryDispute.dispute_id == dispute_id)
                         .values(state="lifted", answered_at=now, answer_seq=seqs[feed_index],
                                 answer_reason=f"{member.id} removed its record"))
        if batch.submissions:
            conn.execute(insert(Submission), [
                {"operator_id": member.id, "code": None, "message": None, **row,
                 "seq": seqs[feed_index] if feed_index is not None else None,
                 "received_at": now}
                for row, feed_index in batch.submissions
            ])
        return seqs

    # -- GET /v1/changes -----------------------------------------------------------------

    def feed(self, member: Member, after: int, limit: int) -> dict[str, Any]:
        """One page of the feed ``member`` may receive, after ``after``, in seq order."""
        with self.db.read() as session:
            conn = session.connection()
            head = conn.execute(select(func.coalesce(func.max(FeedEntry.seq), 0))).scalar_one()
            visible = self._visible(member)
            rows = conn.execute(
                select(FeedEntry).where(FeedEntry.seq > after, FeedEntry.seq <= head, visible)
                .order_by(FeedEntry.seq).limit(limit)
            ).all()
            dispute_ids = [r.dispute_id for r in rows if r.dispute_id]
            disputes = {}
            for start in range(0, len(dispute_ids), _CHUNK):
                for d in conn.execute(select(RegistryDispute).where(
                        RegistryDispute.dispute_id.in_(dispute_ids[start : start + _CHUNK]))):
                    disputes[d.dispute_id] = d
        entries = [_entry(r, disputes.get(r.dispute_id)) for r in rows]
        full = len(rows) == limit
        next_cursor = rows[-1].seq if full else max(head, after)
        return {"after": after, "next": next_cursor, "head": head,
                "more": full and next_cursor < head, "entries": entries}

    def _visible(self, member: Member) -> Any:
        # A change with an audience (a canary, registry/canaries.py) reaches that member only.
        change = (FeedEntry.type == "change") & FeedEntry.audience.is_(None)
        if member.receives == "all":
            profile = change
        elif member.receives == "country":
            profile = change & ((FeedEntry.owner_country == member.country)
                                | (FeedEntry.owner_id == member.id))
        else:
            profile = change & FeedEntry.owner_id.in_([*member.receives, member.id])
        # Disputes reach the owner (audience); answers reach the filer (audience) and, so that
        # its own list closes too, the owner; canaries reach their recipient (audience).
        answer_to_owner = (FeedEntry.type == "dispute_answer") & (FeedEntry.owner_id == member.id)
        return profile | (FeedEntry.audience == member.id) | answer_to_owner

    # -- GET /v1/snapshot ----------------------------------------------------------------

    def snapshot(self, member: Member) -> Snapshot:
        from imeisync.registry.snapshot import Snapshot

        return Snapshot(self.db, member)

    # -- disputes (registry/disputes.py) -------------------------------------------------

    def file_dispute(self, member: Member, body: Any) -> tuple[int, dict[str, Any]]:
        """File a dispute against another operator's open record; (201|200, dispute)."""
        return disputes.file_dispute(self.db, self.member, self._now, member, body)

    def answer_dispute(self, member: Member, dispute_id: str, body: Any) -> dict[str, Any]:
        """The owner's answer: ``lifted`` (its record is removed) or ``upheld`` with a reason."""
        return disputes.answer_dispute(self.db, self._now, member, dispute_id, body)

    # -- sightings (registry/sightings.py) -----------------------------------------------

    def submit_sightings(self, member: Member, body: Any) -> dict[str, Any]:
        """Record ``member``'s sighting notices; each accepted one reaches the owners only."""
        return sightings.submit(self.db, self.clock, member, body)

    def _now(self) -> str:
        return rfc3339(self.clock())


def _field_problem(change: dict[str, Any]) -> str | None:
    unknown = sorted(set(change) - _CHANGE_FIELDS)
    if unknown:
        return f"unknown field(s): {', '.join(u[:32] for u in unknown[:5])}"
    for name in ("action", "reason", "at"):
        if not isinstance(change.get(name), str):
            return f"field {name!r} is missing or not text"
    if change["action"] not in ("insert", "remove"):
        return f"action {change['action'][:16]!r} is not insert or remove"
    try:
        parse_wire_device(change, max_range=MAX_RANGE)
    except BadInput as error:
        return error.message
    if "kind" in change and change["kind"] not in KINDS:
        return f"kind {str(change['kind'])[:16]!r} is not block or track"
    try:
        parse_timestamp(change["at"], "at")
    except BadInput:
        return f"at {change['at'][:40]!r} is not an RFC 3339 time with a time zone"
    return None


def _entry(row: Any, dispute: Any) -> dict[str, Any]:
    base = {"seq": row.seq, "type": row.type, **wire_device(row.imei_key, row.imei_key_last),
            "owner": row.owner_id, "country": row.owner_country, "at": row.at}
    if row.type == "change":
        base.update(change_id=row.change_id, action=row.action, kind=row.kind, reason=row.reason)
    elif row.type == "dispute" and dispute is not None:
        base.update(dispute_id=row.dispute_id, filer=dispute.filer_id,
                    filer_country=dispute.filer_country, case_ref=dispute.case_ref,
                    reason=dispute.reason)
    elif row.type == "dispute_answer" and dispute is not None:
        base.update(dispute_id=row.dispute_id, answer=row.reason,
                    reason=dispute.answer_reason if dispute.answer_seq == row.seq
                    else f"{row.owner_id} removed its record")
    elif row.type == "sighting":
        base.update(notice_id=row.notice_id, reporter=row.reporter_id,
                    reporter_country=row.reporter_country)
    return base
