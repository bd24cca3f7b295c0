"""Synchronisation with the central registry: push the outbox, pull the feed, reconcile with a
snapshot, and say how it stands. The daemon's scheduler calls ``push``/``pull``/``reconcile``;
``imeisync sync …`` calls them by hand.

Rules kept here:

- **push** sends outbox changes in id order, in batches of at most 1,000, and marks each with
  the registry's answer. Rows are marked ``sent`` (and counted) *before* the request, so a
  crash or a lost answer leaves them ``sent`` and the next push sends them again — harmless,
  the registry is idempotent by ``change_id``. A ``rejected`` change is never sent again: it is
  logged, audited, counted in a metric and listed by ``sync status`` (and in the order's
  progress through its outbox row), because it means local and central state disagree.
- **pull** follows the feed from the stored cursor. Each page is verified (signature, shape,
  sequence) by the client, then applied in one write transaction together with the new cursor,
  so a page is applied entirely or not at all, exactly once. A remove closes only its owner's
  record — ``decide_removal``, the rule the order intake and the registry use. Our own changes
  coming back are confirmations (``confirmed_at``), never applied to our records. Disputes about
  our records are stored for liaison staff; answers to ours update them.
- **reconcile** pulls first, downloads the snapshot to a spool file (verified end to end), then
  merges it in (imei, owner) order against the open records: foreign records missing locally are
  opened, extra ones closed, drifted ones (kind, reason, country) closed and reopened; our own
  are never touched, only counted. If it would close more than ``max_shrink`` of the foreign
  records it refuses, alerts and changes nothing, unless forced. Small repairs are computed
  outside the write lock and applied in a short transaction; a bootstrap (no foreign records
  yet) or a large repair streams inside one transaction.

Every change to ``records`` appends a ``change_log`` row (the attach index follows it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from sqlalchemy import bindparam, func, insert, literal, select, tuple_, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from imeisync.adapters.registry_client import (
    Change,
    DisputeAnswerEntry,
    DisputeEntry,
    FeedPage,
    RegistryAnswerRejected,
    RegistryClient,
    SnapshotFile,
)
from imeisync.domain.errors import ImeisyncError, Refused, Unavailable
from imeisync.domain.fields import COUNTRY, OPENING_REASONS, OPERATOR_ID
from imeisync.domain.imei import is_key
from imeisync.domain.ownership import RemovalOutcome, decide_removal
from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.store.db import Database
from imeisync.store.models import ChangeLog, Dispute, OutboxChange, Record, SyncState

log = logging.getLogger(__name__)

CURSOR = "feed.cursor"
HEAD = "feed.head"
STEPS = ("push", "pull", "reconcile")
MAX_BATCH = 1000
SYSTEM_ACTOR = "sync"

PUSH_RESULTS = Counter("imeisync_sync_push_changes", "Outbox changes answered by the registry",
                       ["result"])
REJECTED = Counter("imeisync_sync_rejected_changes",
                   "Outbox changes the registry rejected (local and central state disagree)",
                   ["code"])
PULLED = Counter("imeisync_sync_feed_entries", "Feed entries applied", ["type"])
FAILURES = Counter("imeisync_sync_failures", "Sync steps that failed", ["step"])
SHRINK_REFUSED = Counter("imeisync_sync_reconcile_refused",
                         "Reconciliations refused by the shrink guard")

_CHUNK = 500
_WRITE_BATCH = 5000
_LOCAL_PAGE = 20000
_SMALL_REPAIR = 100_000  # repairs computed outside the write lock up to this many
_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_VALID_KIND_REASON = frozenset((k, r) for k in ("block", "track") for r in OPENING_REASONS)


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_at(at: str) -> datetime:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).astimezone(UTC)


# -- results ---------------------------------------------------------------------------------


@dataclass
class PushResult:
    sent: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    batches: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if not self.sent:
            return "push: nothing to send"
        text = (f"push: {self.sent} change(s) in {self.batches} batch(es): {self.accepted} "
                f"accepted, {self.duplicate} duplicate, {self.rejected} rejected")
        for r in self.rejections[:10]:
            text += (f"\n  rejected {r['action']} of IMEI key {r['imei_key']} (order "
                     f"{r['order_id']}): {r['code']} {r['message']}")
        return text


@dataclass
class PullResult:
    pages: int = 0
    entries: int = 0
    opened: int = 0
    closed: int = 0
    confirmed: int = 0
    disputes: int = 0
    answers: int = 0
    stale: int = 0  # already applied (a page seen again after a reconcile, say)
    skipped: int = 0  # entry types this version does not know
    cursor: int = 0
    head: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"pull: {self.entries} feed entr{'y' if self.entries == 1 else 'ies'} in "
                f"{self.pages} page(s): {self.opened} record(s) opened, {self.closed} closed, "
                f"{self.confirmed} of ours confirmed, {self.disputes} dispute(s) received, "
                f"{self.answers} answer(s); feed position {self.cursor} of {self.head}")


@dataclass
class ReconcileResult:
    seq: int = 0
    records: int = 0
    foreign_before: int = 0
    opened: int = 0
    closed: int = 0
    replaced: int = 0
    unchanged: int = 0
    own_missing: int = 0  # the registry holds an open record of ours we do not
    own_extra: int = 0  # we hold an open record the registry does not (pending push?)
    own_mismatch: int = 0
    mode: str = "short"  # short | streamed | bootstrap
    forced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        text = (f"reconcile at registry position {self.seq}: {self.records} record(s) in the "
                f"snapshot; {self.opened} foreign record(s) opened, {self.closed} closed, "
                f"{self.replaced} corrected, {self.unchanged} unchanged")
        if self.own_missing or self.own_extra or self.own_mismatch:
            text += (f"\n  our own records differ from the registry: {self.own_missing} open "
                     f"there only, {self.own_extra} open here only, {self.own_mismatch} of "
                     "another kind — check `imeisync sync status` and the outbox; own records "
                     "are never changed by a reconcile")
        return text


class ShrinkRefused(Refused):
    """The snapshot would close too many foreign records: nothing was changed."""

    def __init__(self, closing: int, foreign: int, max_shrink: float, seq: int):
        share = closing / foreign if foreign else 1.0
        super().__init__(
            f"reconcile refused: the snapshot at registry position {seq} would close {closing} "
            f"of {foreign} foreign records ({share:.0%}), more than [sync] max_shrink "
            f"({max_shrink:.0%}); nothing was changed",
            "check the registry and your receive profile; if the shrink is right, run "
            "`imeisync sync reconcile --force`",
            code="shrink_guard",
        )
        self.closing, self.foreign, self.share, self.seq = closing, foreign, share, seq


# -- the service -------------------------------------------------------------------------------


class SyncService:
    def __init__(
        self,
        db: Database,
        client: Callable[[], RegistryClient],
        *,
        operator_id: str,
        operator_country: str,
        max_shrink: float = 0.25,
        spool_dir: Path | None = None,
        clock: Callable[[], datetime] = _now,
    ):
        self.db = db
        self._client_factory = client
        self._client: RegistryClient | None = None
        self.me = operator_id
        self.country = operator_country
        self.max_shrink = max_shrink
        self.spool_dir = spool_dir
        self.clock = clock

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    @contextlib.contextmanager
    def _step(self, step: str) -> Iterator[None]:
        """Record the step's success (or its error, and a metric) in ``sync_state``."""
        try:
            yield
        except ImeisyncError as exc:
            FAILURES.labels(step).inc()
            log.warning("sync %s failed: %s", step, exc)
            with contextlib.suppress(ImeisyncError), self.db.write() as session:
                _set_state(session, f"{step}.last_error",
                           json.dumps({"at": rfc3339(self.clock()), "error": str(exc)[:500],
                                       "code": exc.code}), self.clock())
            raise
        with self.db.write() as session:
            now = self.clock()
            _set_state(session, f"{step}.last_success", rfc3339(now) or "", now)
            session.execute(SyncState.__table__.delete().where(
                SyncState.name == f"{step}.last_error"))

    # -- push --------------------------------------------------------------------------

    def push(self, *, batch_size: int = MAX_BATCH, max_batches: int | None = None) -> PushResult:
        """Send pending (and unanswered sent) outbox changes; mark each with its answer."""
        batch_size = max(1, min(batch_size, MAX_BATCH))
        result = PushResult()
        with self._step("push"):
            while max_batches is None or result.batches < max_batches:
                rows = self._claim(batch_size)
                if not rows:
                    break
                result.batches += 1
                result.sent += len(rows)
                changes = [_wire_change(row) for row in rows]
                try:
                    answers = self.client.push(changes)
                except ImeisyncError as exc:
                    self._note_failure([row["id"] for row in rows], str(exc))
                    raise
                self._record(rows, answers, result)
                if len(rows) < batch_size:
                    break
        return result

    def _claim(self, batch_size: int) -> list[dict[str, Any]]:
        outbox = OutboxChange.__table__
        with self.db.write() as session:
            rows = [dict(r._mapping) for r in session.execute(
                select(outbox.c.id, outbox.c.change_id, outbox.c.order_id, outbox.c.action,
                       outbox.c.imei_key, outbox.c.kind, outbox.c.reason, outbox.c.at)
                .where(outbox.c.state.in_(("pending", "sent"))).order_by(outbox.c.id)
                .limit(batch_size))]
            if rows:
                now = self.clock()
                session.execute(
                    update(outbox).where(outbox.c.id == bindparam("b_id"))
                    .values(state="sent", attempts=outbox.c.attempts + 1, sent_at=now),
                    [{"b_id": r["id"]} for r in rows])
        return rows

    def _note_failure(self, ids: list[int], error: str) -> None:
        outbox = OutboxChange.__table__
        with contextlib.suppress(ImeisyncError), self.db.write() as session:
            session.execute(update(outbox).where(outbox.c.id == bindparam("b_id"))
                            .values(last_error=error[:1000]), [{"b_id": i} for i in ids])

    def _record(self, rows: list[dict[str, Any]], answers: list[dict[str, Any]],
                result: PushResult) -> None:
        outbox = OutboxChange.__table__
        now = self.clock()
        updates, events = [], []
        for row, answer in zip(rows, answers, strict=True):
            outcome = answer["result"]
            PUSH_RESULTS.labels(outcome).inc()
            code = answer.get("code") if outcome == "rejected" else None
            message = str(answer.get("message") or "")[:1000] if outcome == "rejected" else None
            updates.append({"b_id": row["id"], "b_state": outcome, "b_code": code,
                            "b_error": message})
            if outcome == "accepted":
                result.accepted += 1
            elif outcome == "duplicate":
                result.duplicate += 1
            else:
                result.rejected += 1
                REJECTED.labels(str(code)).inc()
                rejection = {"change_id": row["change_id"], "order_id": row["order_id"],
                             "action": row["action"], "imei_key": row["imei_key"],
                             "code": code, "message": message}
                result.rejections.append(rejection)
                log.error("registry rejected %s of IMEI key %s (order %s, change %s): %s %s — "
                          "local and central state disagree", row["action"], row["imei_key"],
                          row["order_id"], row["change_id"], code, message)
                events.append(audit.Event(
                    actor=SYSTEM_ACTOR, role="system", action="sync.rejected",
                    outcome="rejected", at=now, imei_key=row["imei_key"],
                    detail={"change_id": row["change_id"], "order_id": row["order_id"],
                            "action": row["action"], "code": code, "message": message}))
        with self.db.write() as session:
            # Only rows still "sent": a concurrent push or pull may have settled them already.
            session.execute(
                update(outbox).where(outbox.c.id == bindparam("b_id"), outbox.c.state == "sent")
                .values(state=bindparam("b_state"), result_code=bindparam("b_code"),
                        last_error=bindparam("b_error")), updates)
            audit.append(session, events)

    # -- pull --------------------------------------------------------------------------

    def pull(self, *, page_size: int = 5000, max_pages: int | None = None) -> PullResult:
        """Apply feed pages from the cursor until the registry has nothing newer.

        The next page is fetched (and verified) while the current one is applied; a page is
        applied only if the stored cursor is still where it was asked from.
        """
        result = PullResult()
        with self._step("pull"), ThreadPoolExecutor(1, "imeisync-feed") as fetcher:
            cursor = self.cursor()
            ahead: Future[FeedPage] | None = fetcher.submit(self.client.feed_page, cursor,
                                                            page_size)
            while ahead is not None and (max_pages is None or result.pages < max_pages):
                page = ahead.result()
                ahead = None
                if page.more and (max_pages is None or result.pages + 1 < max_pages):
                    ahead = fetcher.submit(self.client.feed_page, page.next, page_size)
                with self.db.write() as session:
                    current = _cursor(session)
                    if current != page.after:  # another puller got here first
                        cursor = current
                        if ahead is not None:
                            with contextlib.suppress(ImeisyncError):
                                ahead.result()
                        ahead = fetcher.submit(self.client.feed_page, cursor, page_size)
                        continue
                    self._apply_page(session, page, result)
                    now = self.clock()
                    _set_state(session, CURSOR, str(page.next), now)
                    _set_state(session, HEAD, str(page.head), now)
                result.pages += 1
                cursor = result.cursor = page.next
                result.head = page.head
        result.cursor = cursor
        return result

    def _apply_page(self, session: Session, page: FeedPage, result: PullResult) -> None:
        conn = session.connection()
        _feed_cache(conn)
        now = self.clock()
        foreign = [e for e in page.entries if isinstance(e, Change) and e.owner_id != self.me]
        keys = sorted({e.imei_key for e in foreign})
        open_by_key: dict[str, list[_Local]] = {}
        records = Record.__table__
        for start in range(0, len(keys), _CHUNK):
            for row in conn.execute(
                select(records.c.id, records.c.imei_key, records.c.owner_id,
                       records.c.owner_country, records.c.kind, records.c.reason)
                .where(records.c.imei_key.in_(keys[start : start + _CHUNK]),
                       records.c.closed_at.is_(None))
            ):
                open_by_key.setdefault(row.imei_key, []).append(
                    _Local(row.owner_id, row.owner_country, row.kind, row.reason, id=row.id))
        plan = _Plan(conn, now)
        confirmations: list[str] = []
        disputes: list[DisputeEntry] = []
        answers: list[DisputeAnswerEntry] = []
        for entry in page.entries:
            result.entries += 1
            if isinstance(entry, Change):
                if entry.owner_id == self.me:
                    confirmations.append(entry.change_id)
                elif entry.action == "insert":
                    self._plan_insert(plan, open_by_key.setdefault(entry.imei_key, []), entry,
                                      result)
                else:
                    opened = open_by_key.setdefault(entry.imei_key, [])
                    decision = decide_removal(opened, entry.owner_id)
                    if decision.outcome is not RemovalOutcome.ALLOWED:
                        result.stale += 1  # closed already, or never received
                        continue
                    for record in decision.own:
                        opened.remove(record)
                        plan.close(record, entry.imei_key, entry.change_id, entry.reason)
                        result.closed += 1
            elif isinstance(entry, DisputeEntry):
                disputes.append(entry)
            else:
                answers.append(entry)
        result.skipped += page.skipped
        PULLED.labels("change").inc(len(page.entries) - len(disputes) - len(answers))
        PULLED.labels("dispute").inc(len(disputes))
        PULLED.labels("dispute_answer").inc(len(answers))
        plan.write()
        if confirmations:
            outbox = OutboxChange.__table__
            for start in range(0, len(confirmations), _CHUNK):
                part = confirmations[start : start + _CHUNK]
                conn.execute(update(outbox).where(outbox.c.change_id.in_(part),
                                                  outbox.c.confirmed_at.is_(None))
                             .values(confirmed_at=now))
                # Seen in the feed proves acceptance, even if the push's answer was lost.
                conn.execute(update(outbox).where(outbox.c.change_id.in_(part),
                                                  outbox.c.state.in_(("pending", "sent")))
                             .values(state="accepted"))
            result.confirmed += len(confirmations)
        events = self._apply_disputes(session, disputes, answers, now, result)
        events.append(audit.Event(
            actor=SYSTEM_ACTOR, role="system", action="sync.pull", outcome="ok", at=now,
            detail={"after": page.after, "next": page.next, "entries": len(page.entries),
                    "opened": len(plan.opens), "closed": len(plan.closes)}))
        audit.append(session, events)

    @staticmethod
    def _plan_insert(plan: _Plan, opened: list[_Local], entry: Change,
                     result: PullResult) -> None:
        mine = [r for r in opened if r.owner_id == entry.owner_id]
        if mine and all(r.kind == entry.kind and r.reason == entry.reason
                        and r.owner_country == entry.owner_country for r in mine):
            result.stale += 1
            return
        for record in mine:  # the owner's record as we knew it is superseded
            opened.remove(record)
            plan.close(record, entry.imei_key, entry.change_id, "superseded")
            result.closed += 1
        record = plan.open(entry.imei_key, entry.owner_id, entry.owner_country, entry.kind,
                           entry.reason, entry.at, entry.change_id, entry.seq)
        opened.append(record)
        result.opened += 1

    def _apply_disputes(self, session: Session, disputes: list[DisputeEntry],
                        answers: list[DisputeAnswerEntry], now: datetime,
                        result: PullResult) -> list[audit.Event]:
        events: list[audit.Event] = []
        table = Dispute.__table__
        for d in disputes:
            if d.owner_id != self.me:
                continue  # not addressed to us: nothing to do
            exists = session.execute(select(table.c.id).where(
                table.c.dispute_id == d.dispute_id)).first()
            if exists:
                continue
            session.execute(insert(table).values(
                dispute_id=d.dispute_id, direction="received", imei_key=d.imei_key,
                filer_id=d.filer_id, filer_country=d.filer_country, owner_id=d.owner_id,
                owner_country=d.owner_country, case_ref=d.case_ref, reason=d.reason,
                filed_at=_parse_at(d.at), state="open", registry_seq=d.seq))
            result.disputes += 1
            log.warning("dispute %s received: %s (%s) asks us to review our record of IMEI key "
                        "%s (their case %s)", d.dispute_id, d.filer_id, d.filer_country,
                        d.imei_key, d.case_ref)
            events.append(audit.Event(
                actor=SYSTEM_ACTOR, role="system", action="dispute.received", outcome="open",
                at=now, imei_key=d.imei_key,
                detail={"dispute_id": d.dispute_id, "filer": d.filer_id,
                        "filer_case_ref": d.case_ref}))
        for a in answers:
            row = session.execute(select(table.c.id, table.c.state, table.c.direction).where(
                table.c.dispute_id == a.dispute_id)).first()
            if row is None:
                log.warning("answer to unknown dispute %s ignored", a.dispute_id)
                result.stale += 1
                continue
            if row.state == a.answer:
                continue
            session.execute(update(table).where(table.c.id == row.id).values(
                state=a.answer, answer_reason=a.reason, answered_at=_parse_at(a.at),
                registry_seq=a.seq))
            result.answers += 1
            events.append(audit.Event(
                actor=SYSTEM_ACTOR, role="system", action="dispute.answered", outcome=a.answer,
                at=now, imei_key=a.imei_key,
                detail={"dispute_id": a.dispute_id, "owner": a.owner_id,
                        "direction": row.direction}))
        return events

    # -- reconcile -----------------------------------------------------------------------

    def reconcile(self, *, force: bool = False) -> ReconcileResult:
        """Repair foreign records from a verified snapshot, under the shrink guard."""
        with self._step("reconcile"):
            bootstrap = self.cursor_or_none() is None
            if not bootstrap:
                self.pull()  # the snapshot is then at or after our feed position
            with tempfile.TemporaryDirectory(prefix="imeisync-snapshot-",
                                             dir=self.spool_dir) as folder:
                snapshot = self.client.snapshot(Path(folder) / "snapshot.csv")
                try:
                    result = self._reconcile(snapshot, force, bootstrap)
                except ShrinkRefused as refused:
                    self._refused(refused)
                    raise
        return result

    def _reconcile(self, snapshot: SnapshotFile, force: bool, bootstrap: bool,
                   ) -> ReconcileResult:
        with self.db.read() as session:
            cursor_before = _cursor_or_none(session)
            foreign = session.execute(select(func.count()).select_from(Record).where(
                Record.closed_at.is_(None), Record.source == "registry")).scalar_one()
        if foreign and not bootstrap:
            # Compute the repair outside the write lock; apply it in a short transaction if
            # nothing moved meanwhile.
            result = ReconcileResult(seq=snapshot.seq, forced=force, mode="short")
            with self.db.read() as session:
                ops = _collect(self._merge(session.connection(), snapshot, result),
                               _SMALL_REPAIR)
            if ops is not None:
                self._guard(result, force)
                with self.db.write() as session:
                    if _cursor_or_none(session) == cursor_before:
                        self._check_position(session, snapshot)
                        writer = _Writer(session.connection(), self.clock(), snapshot.seq)
                        writer.apply(ops)
                        writer.flush()
                        self._finish(session, result, snapshot)
                        return result
        # Bootstrap, a large repair, or the feed moved: merge inside one write transaction.
        result = ReconcileResult(seq=snapshot.seq, forced=force,
                                 mode="bootstrap" if not foreign else "streamed")
        with self.db.write() as session:
            self._check_position(session, snapshot)
            conn = session.connection()
            with _bulk_pragmas(conn):
                empty = conn.execute(select(Record.id).where(Record.closed_at.is_(None))
                                     .limit(1)).first() is None
                if empty:  # nothing to merge against: insert straight from the spool
                    self._load(conn, snapshot, result)
                else:
                    writer = _Writer(conn, self.clock(), snapshot.seq)
                    writer.apply(self._merge(conn, snapshot, result))
                    self._guard(result, force)  # raises: the transaction rolls back
                    writer.flush()
            if _cursor_or_none(session) is None:
                _set_state(session, CURSOR, str(snapshot.seq), self.clock())
            self._finish(session, result, snapshot)
        return result

    def _load(self, conn: Connection, snapshot: SnapshotFile, result: ReconcileResult) -> None:
        """An empty store: every snapshot record is opened (ours are only counted), then
        their change_log rows are written in one statement, in id order."""
        raw = _Raw(conn)
        opened_by = f"snapshot@{snapshot.seq}"
        me = self.me
        time_of = raw.time_checked
        first_id = conn.execute(select(func.coalesce(func.max(Record.id), 0))).scalar_one()

        def rows() -> Iterator[tuple[Any, ...]]:
            for key, owner, country, kind, reason, seq, at in _snapshot_rows(snapshot.path):
                result.records += 1
                if owner == me:
                    result.own_missing += 1
                    continue
                yield (key, owner, country, kind, reason, "registry", time_of(at), opened_by,
                       seq, None, None, None)

        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(raw.insert_sql, rows())
        finally:
            cursor.close()
        result.opened = result.records - result.own_missing
        conn.execute(
            insert(ChangeLog.__table__).from_select(
                ["imei_key", "subject", "op", "kind", "at"],
                select(Record.imei_key, literal("record"), literal("open"), Record.kind,
                       literal(self.clock(), Record.__table__.c.opened_at.type))
                .where(Record.id > first_id).order_by(Record.id)))

    def _check_position(self, session: Session, snapshot: SnapshotFile) -> None:
        cursor = _cursor_or_none(session)
        if cursor is not None and cursor > snapshot.seq:
            raise Unavailable(
                f"the feed moved past the snapshot (position {cursor} > {snapshot.seq}) while "
                "it was downloaded; nothing was changed", "run `imeisync sync reconcile` again",
                code="snapshot_outdated")

    def _guard(self, result: ReconcileResult, force: bool) -> None:
        closing = result.closed
        if (result.foreign_before and closing / result.foreign_before > self.max_shrink
                and not force):
            raise ShrinkRefused(closing, result.foreign_before, self.max_shrink, result.seq)

    def _finish(self, session: Session, result: ReconcileResult, snapshot: SnapshotFile) -> None:
        now = self.clock()
        _set_state(session, "reconcile.last_result",
                   json.dumps({"at": rfc3339(now), **result.as_dict()}), now)
        session.execute(SyncState.__table__.delete().where(SyncState.name == "reconcile.refused"))
        audit.append(session, [audit.Event(
            actor=SYSTEM_ACTOR, role="system", action="sync.reconcile",
            outcome="forced" if result.forced and result.closed else "ok", at=now,
            detail=result.as_dict())])
        if result.own_missing or result.own_extra or result.own_mismatch:
            log.warning("reconcile: our own records differ from the registry's (%d there only, "
                        "%d here only, %d of another kind)", result.own_missing,
                        result.own_extra, result.own_mismatch)

    def _refused(self, refused: ShrinkRefused) -> None:
        SHRINK_REFUSED.inc()
        log.error("%s", refused)
        now = self.clock()
        with contextlib.suppress(ImeisyncError), self.db.write() as session:
            _set_state(session, "reconcile.refused", json.dumps({
                "at": rfc3339(now), "seq": refused.seq, "closing": refused.closing,
                "foreign": refused.foreign, "share": round(refused.share, 4),
                "max_shrink": self.max_shrink}), now)
            audit.append(session, [audit.Event(
                actor=SYSTEM_ACTOR, role="system", action="sync.reconcile", outcome="refused",
                at=now, detail={"seq": refused.seq, "closing": refused.closing,
                                "foreign": refused.foreign})])

    def _merge(self, conn: Connection, snapshot: SnapshotFile,
               result: ReconcileResult) -> Iterator[tuple[Any, ...]]:
        """Walk the snapshot and the open records in (imei, owner) order; yield repairs:
        ("open", row) | ("close", id, key, kind) | ("replace", id, key, kind, row)."""
        me = self.me
        local = _local_open(conn, self.db.dialect)
        remote = _snapshot_rows(snapshot.path)
        loc = next(local, None)
        rem = next(remote, None)
        while loc is not None or rem is not None:
            if loc is None or (rem is not None and rem[:2] < loc[:2]):
                assert rem is not None
                result.records += 1
                if rem[1] == me:
                    result.own_missing += 1
                else:
                    result.opened += 1
                    yield ("open", rem)
                rem = next(remote, None)
            elif rem is None or rem[:2] > loc[:2]:
                if loc[1] == me:
                    result.own_extra += 1
                else:
                    result.foreign_before += 1
                    result.closed += 1
                    yield ("close", loc[5], loc[0], loc[3])
                loc = next(local, None)
            else:
                result.records += 1
                if loc[1] == me:
                    if loc[3] != rem[3]:
                        result.own_mismatch += 1
                else:
                    result.foreign_before += 1
                    if (loc[2], loc[3], loc[4]) != (rem[2], rem[3], rem[4]):
                        result.replaced += 1
                        yield ("replace", loc[5], loc[0], loc[3], rem)
                    else:
                        result.unchanged += 1
                loc = next(local, None)
                rem = next(remote, None)

    # -- status --------------------------------------------------------------------------

    def cursor(self) -> int:
        value = self.cursor_or_none()
        return value or 0

    def cursor_or_none(self) -> int | None:
        with self.db.read() as session:
            return _cursor_or_none(session)

    def status(self, *, rejected_limit: int = 20) -> dict[str, Any]:
        now = self.clock()
        outbox = OutboxChange.__table__
        with self.db.read() as session:
            states = {name: value for name, value in session.execute(
                select(SyncState.name, SyncState.value))}
            depth = {state: count for state, count in session.execute(
                select(outbox.c.state, func.count()).group_by(outbox.c.state))}
            unconfirmed = session.execute(select(func.count()).select_from(outbox).where(
                outbox.c.state.in_(("accepted", "duplicate")),
                outbox.c.confirmed_at.is_(None))).scalar_one()
            rejected = [dict(r._mapping) for r in session.execute(
                select(outbox.c.change_id, outbox.c.order_id, outbox.c.action,
                       outbox.c.imei_key, outbox.c.result_code, outbox.c.last_error,
                       outbox.c.sent_at)
                .where(outbox.c.state == "rejected").order_by(outbox.c.id.desc())
                .limit(rejected_limit))]
            oldest_pending = session.execute(select(func.min(outbox.c.at)).where(
                outbox.c.state.in_(("pending", "sent")))).scalar_one()
            disputes = {f"{d}_{s}": c for d, s, c in session.execute(
                select(Dispute.direction, Dispute.state, func.count())
                .group_by(Dispute.direction, Dispute.state))}
        if oldest_pending is not None and oldest_pending.tzinfo is None:
            oldest_pending = oldest_pending.replace(tzinfo=UTC)
        steps = {}
        for step in STEPS:
            last = states.get(f"{step}.last_success")
            error = states.get(f"{step}.last_error")
            age = (now - _parse_iso(last)).total_seconds() if last else None
            steps[step] = {"last_success": last, "age_seconds": round(age) if age is not None
                           else None, "last_error": json.loads(error) if error else None}
        for row in rejected:
            row["sent_at"] = rfc3339(row["sent_at"])
        return {
            "operator": self.me,
            "cursor": int(states.get(CURSOR, 0)),
            "registry_head": int(states[HEAD]) if HEAD in states else None,
            "outbox": {s: depth.get(s, 0) for s in
                       ("pending", "sent", "accepted", "duplicate", "rejected")},
            "unconfirmed": unconfirmed,
            "oldest_unsent_age_seconds": round((now - oldest_pending).total_seconds())
            if oldest_pending else None,
            "rejected": rejected,
            "steps": steps,
            "reconcile_last": json.loads(states["reconcile.last_result"])
            if "reconcile.last_result" in states else None,
            "reconcile_refused": json.loads(states["reconcile.refused"])
            if "reconcile.refused" in states else None,
            "disputes": disputes,
        }


# -- helpers -----------------------------------------------------------------------------------


def _parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _wire_change(row: dict[str, Any]) -> dict[str, Any]:
    at = row["at"]
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    change = {"change_id": row["change_id"], "action": row["action"], "imei": row["imei_key"],
              "reason": row["reason"], "at": at.astimezone(UTC).strftime(
                  "%Y-%m-%dT%H:%M:%S.%fZ")}
    if row["action"] == "insert":
        change["kind"] = row["kind"]
    return change


def _cursor_or_none(session: Session) -> int | None:
    value = session.execute(select(SyncState.value).where(SyncState.name == CURSOR)).scalar()
    return int(value) if value is not None else None


def _cursor(session: Session) -> int:
    return _cursor_or_none(session) or 0


def _set_state(session: Session, name: str, value: str, now: datetime) -> None:
    table = SyncState.__table__
    updated = session.execute(update(table).where(table.c.name == name)
                              .values(value=value, updated_at=now)).rowcount
    if not updated:
        session.execute(insert(table).values(name=name, value=value, updated_at=now))


@dataclass(eq=False)
class _Local:
    """An open record while a feed page is applied (``RecordLike`` for ``decide_removal``)."""

    owner_id: str
    owner_country: str
    kind: str
    reason: str
    id: int | None = None
    new: list[Any] | None = None  # the row to insert, when opened by this page


class _Raw:
    """Bulk writes to ``records`` and ``change_log`` through the driver's ``executemany``.

    The feed and the snapshot write up to millions of rows; SQLAlchemy's per-row parameter
    processing would cost more than the database. Values are converted here, once, to what
    the store's column types would have bound (SQLite keeps times as text).
    """

    def __init__(self, conn: Connection):
        self.conn = conn
        self.sqlite = conn.dialect.name == "sqlite"
        mark = "?" if self.sqlite else "%s"
        self.insert_sql = (
            "INSERT INTO records (imei_key, owner_id, owner_country, kind, reason, source, "
            "opened_at, opened_by, registry_seq, closed_at, closed_by, close_reason) "
            f"VALUES ({', '.join([mark] * 12)})")
        self.close_sql = (f"UPDATE records SET closed_at = {mark}, closed_by = {mark}, "
                          f"close_reason = {mark} WHERE id = {mark}")
        self.log_sql = ("INSERT INTO change_log (imei_key, subject, op, kind, at) "
                        f"VALUES ({mark}, 'record', {mark}, {mark}, {mark})")

    def time(self, moment: datetime) -> Any:
        """As ``UTCDateTime`` stores it: SQLAlchemy's SQLite text form, or an aware UTC
        datetime for PostgreSQL."""
        moment = moment.astimezone(UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else moment

    def time_checked(self, at: str) -> Any:
        """A time already checked to be in the registry's form (``_snapshot_rows``)."""
        return f"{at[:10]} {at[11:26]}" if self.sqlite else datetime.fromisoformat(at)

    def time_of(self, at: str) -> Any:
        """A feed or snapshot time (RFC 3339) as the store binds it."""
        if self.sqlite and len(at) == 27 and _AT.fullmatch(at):  # the registry's own form
            return f"{at[:10]} {at[11:26]}"
        return self.time(_parse_at(at))

    def write(self, opens: list[Any], closes: list[Any], log: list[Any]) -> None:
        """Closes first (a record reopened in the same batch needs its slot), then opens,
        then the change_log rows in the order the changes happened."""
        cursor = self.conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if closes:
                cursor.executemany(self.close_sql, closes)
            if opens:
                cursor.executemany(self.insert_sql, [tuple(row) for row in opens])
            if log:
                cursor.executemany(self.log_sql, log)
        finally:
            cursor.close()


class _Plan:
    """A feed page's writes, in feed order, issued in bulk."""

    def __init__(self, conn: Connection, now: datetime) -> None:
        self.raw = _Raw(conn)
        self.now = self.raw.time(now)
        self.opens: list[list[Any]] = []
        self.closes: list[tuple[Any, ...]] = []
        self.log: list[tuple[Any, ...]] = []

    def open(self, key: str, owner: str, country: str, kind: str, reason: str, at: str,
             change_id: str, seq: int) -> _Local:
        row = [key, owner, country, kind, reason, "registry", self.raw.time_of(at), change_id,
               seq, None, None, None]
        self.opens.append(row)
        self.log.append((key, "open", kind, self.now))
        return _Local(owner, country, kind, reason, new=row)

    def close(self, record: _Local, key: str, change_id: str, reason: str) -> None:
        if record.new is not None:
            record.new[9:12] = [self.now, change_id, reason]
        else:
            self.closes.append((self.now, change_id, reason, record.id))
        self.log.append((key, "close", record.kind, self.now))

    def write(self) -> None:
        self.raw.write(self.opens, self.closes, self.log)


def _collect(ops: Iterable[tuple[Any, ...]], limit: int) -> list[tuple[Any, ...]] | None:
    """The repairs as a list, or None when there are more than ``limit``."""
    collected: list[tuple[Any, ...]] = []
    for op in ops:
        collected.append(op)
        if len(collected) > limit:
            return None
    return collected


def _local_open(conn: Connection, dialect: str) -> Iterator[tuple[Any, ...]]:
    """Open records (own and foreign) in (imei, owner) byte order, page by page (each page is
    read whole, so writes made meanwhile behind the position are never seen)."""
    records = Record.__table__
    owner = records.c.owner_id.collate("C") if dialect == "postgresql" else records.c.owner_id
    columns = (records.c.imei_key, records.c.owner_id, records.c.owner_country,
               records.c.kind, records.c.reason, records.c.id)
    after: tuple[str, str] | None = None
    while True:
        query = select(*columns).where(records.c.closed_at.is_(None))
        if after is not None:
            query = query.where(tuple_(records.c.imei_key, owner) > tuple_(*after))
        rows = conn.execute(query.order_by(records.c.imei_key, owner).limit(_LOCAL_PAGE)).all()
        for row in rows:
            yield tuple(row)
        if len(rows) < _LOCAL_PAGE:
            return
        after = (rows[-1][0], rows[-1][1])


def _snapshot_rows(path: Path) -> Iterator[tuple[str, str, str, str, str, int, str]]:
    """The verified spool's records, each checked, in strictly increasing (imei, owner) order.

    Raises ``RegistryAnswerRejected`` naming the line; the caller's transaction rolls back.
    (The file is read as ASCII with replacement, so a non-ASCII byte never passes a check.)
    """
    owners: set[str] = set()
    countries: set[str] = set()
    at_match = _AT.fullmatch
    valid = _VALID_KIND_REASON
    last_key, last_owner = "", ""
    with open(path, encoding="ascii", errors="replace") as lines:
        next(lines)  # the column line, checked while downloading
        for number, line in enumerate(lines, start=2):
            try:
                key, owner, country, kind, reason, seq, at = line[:-1].split(",")
            except ValueError:
                raise RegistryAnswerRejected(
                    f"snapshot line {number} does not have 7 fields") from None
            if not is_key(key):
                raise RegistryAnswerRejected(f"snapshot line {number}: {key[:20]!r} is not a "
                                             "14-digit IMEI key")
            if owner not in owners:
                if not OPERATOR_ID.fullmatch(owner):
                    raise RegistryAnswerRejected(f"snapshot line {number}: owner "
                                                 f"{owner[:30]!r} is not an operator id")
                owners.add(owner)
            if country not in countries:
                if not COUNTRY.fullmatch(country):
                    raise RegistryAnswerRejected(f"snapshot line {number}: {country[:8]!r} "
                                                 "is not a country code")
                countries.add(country)
            if (kind, reason) not in valid:
                raise RegistryAnswerRejected(f"snapshot line {number}: kind/reason "
                                             f"{kind[:10]!r}/{reason[:20]!r} is not known")
            if not seq.isdigit() or at_match(at) is None:
                raise RegistryAnswerRejected(f"snapshot line {number}: bad seq or time")
            if key < last_key or (key == last_key and owner <= last_owner):
                raise RegistryAnswerRejected(f"snapshot line {number} is out of order or "
                                             "repeated")
            last_key, last_owner = key, owner
            yield key, owner, country, kind, reason, int(seq), at


_FEED_CACHE_KIB = 131072  # 128 MiB


def _feed_cache(conn: Connection) -> None:
    """Give the connection applying feed pages a page cache that holds the records' indexes'
    working set. SQLite's default (2 MiB) makes every page of a large pull evict and re-read
    index pages (10x slower at 1M changes). Kept on the pooled connection: it only grows
    when used, and the next page applied benefits from the pages cached."""
    if conn.dialect.name == "sqlite":
        current = conn.exec_driver_sql("PRAGMA cache_size").scalar() or 0
        if -int(current) < _FEED_CACHE_KIB:
            conn.exec_driver_sql(f"PRAGMA cache_size = -{_FEED_CACHE_KIB}")


@contextlib.contextmanager
def _bulk_pragmas(conn: Connection) -> Iterator[None]:
    """A larger page cache for a bulk merge on SQLite (restored afterwards)."""
    if conn.dialect.name != "sqlite":
        yield
        return
    before = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    conn.exec_driver_sql("PRAGMA cache_size = -262144")  # 256 MiB
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size = {int(before)}")


class _Writer:
    """Applies reconcile repairs in batches (see ``_Raw``)."""

    def __init__(self, conn: Connection, now: datetime, seq: int):
        self.raw = _Raw(conn)
        self.now = self.raw.time(now)
        self.opened_by = f"snapshot@{seq}"
        self.closed_by = f"reconcile@{seq}"
        self.opens: list[tuple[Any, ...]] = []
        self.closes: list[tuple[Any, ...]] = []
        self.log: list[tuple[Any, ...]] = []

    def apply(self, ops: Iterable[tuple[Any, ...]]) -> None:
        for op in ops:
            if op[0] == "open":
                self._open(op[1])
            elif op[0] == "close":
                self._close(op[1], op[2], op[3])
            else:
                self._close(op[1], op[2], op[3])
                self._open(op[4])
            if len(self.log) >= _WRITE_BATCH:
                self.flush()

    def _open(self, row: tuple[str, str, str, str, str, int, str]) -> None:
        key, owner, country, kind, reason, seq, at = row
        self.opens.append((key, owner, country, kind, reason, "registry",
                           self.raw.time_checked(at), self.opened_by, seq, None, None, None))
        self.log.append((key, "open", kind, self.now))

    def _close(self, record_id: int, key: str, kind: str) -> None:
        self.closes.append((self.now, self.closed_by, "reconcile", record_id))
        self.log.append((key, "close", kind, self.now))

    def flush(self) -> None:
        self.raw.write(self.opens, self.closes, self.log)
        self.opens, self.closes, self.log = [], [], []

