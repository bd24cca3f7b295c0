"""What each sync step reports (``describe()`` for people, ``as_dict()`` for JSON), and the
shrink guard's refusal."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imeisync.domain.errors import Refused


@dataclass
class _Result:
    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SightingsResult(_Result):
    """Sighting notices pushed to the registry (``services/sync/sightings.py``)."""

    sent: int = 0
    accepted: int = 0  # accepted, or a duplicate of one accepted before
    rejected: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        text = f"sighting notices: {self.accepted} accepted, {self.rejected} rejected"
        for r in self.rejections[:10]:
            text += (f"\n  rejected notice {r['notice_id']} of IMEI key {r['imei_key']}: "
                     f"{r['error']}")
        return text


@dataclass
class PushResult(_Result):
    sent: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    batches: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)
    sightings: SightingsResult | None = None  # None when the notices' push failed

    def describe(self) -> str:
        notices = self.sightings
        if notices is None:
            tail = "; sighting notices not sent this time (`imeisync sync status` says why)"
        else:
            tail = f"; {notices.describe()}" if notices.accepted or notices.rejected else ""
        if not self.sent:
            return "push: nothing to send" + tail
        text = (f"push: {self.sent} change(s) in {self.batches} batch(es): {self.accepted} "
                f"accepted, {self.duplicate} duplicate, {self.rejected} rejected")
        for r in self.rejections[:10]:
            text += (f"\n  rejected {r['action']} of IMEI key {r['imei_key']} (order "
                     f"{r['order_id']}): {r['code']} {r['message']}")
        return text + tail


@dataclass
class PullResult(_Result):
    pages: int = 0
    entries: int = 0
    opened: int = 0
    closed: int = 0
    confirmed: int = 0
    disputes: int = 0
    answers: int = 0
    stale: int = 0  # already applied (a page seen again after a reconcile, say)
    skipped: int = 0  # entry types this version does not know
    sightings: int = 0  # sightings of our tracked devices on other networks, recorded
    sightings_refused: int = 0  # sighting entries not for our open track records, malformed
    cursor: int = 0
    head: int = 0
    acked: int | None = None  # the applied position acknowledged to the registry, if sent

    def describe(self) -> str:
        acked = f"; applied through {self.acked} acknowledged" if self.acked is not None else ""
        return (f"pull: {self.entries} feed entr{'y' if self.entries == 1 else 'ies'} in "
                f"{self.pages} page(s): {self.opened} record(s) opened, {self.closed} closed, "
                f"{self.confirmed} of ours confirmed, {self.disputes} dispute(s) received, "
                f"{self.answers} answer(s){self._sightings()}; feed position {self.cursor} of "
                f"{self.head}{acked}")

    def _sightings(self) -> str:
        if not self.sightings and not self.sightings_refused:
            return ""
        refused = f" ({self.sightings_refused} refused)" if self.sightings_refused else ""
        return f", {self.sightings} sighting(s) of ours elsewhere{refused}"


@dataclass
class ReceiptsResult(_Result):
    fetched: int = 0
    completed: int = 0  # became "applied everywhere" in this poll
    waiting: int = 0  # fetched, still not applied by every recipient
    unknown: int = 0  # the registry has no receipt (yet) for the change
    overdue: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        if not self.fetched and not self.unknown and not self.overdue:
            return "receipts: nothing to ask"
        text = (f"receipts: {self.fetched} fetched, {self.completed} now applied everywhere, "
                f"{self.waiting} still waiting")
        for o in self.overdue[:10]:
            text += (f"\n  OVERDUE lift of order {o['order_id']}: not applied by "
                     f"{', '.join(m['member'] for m in o['missing']) or '?'}")
        return text


@dataclass
class ReconcileResult(_Result):
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
