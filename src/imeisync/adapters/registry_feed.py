"""The registry's feed as the operator understands it: the entry types and the check of a
page, complete before anything of it is applied (used by ``adapters.registry_client``).

An entry of a type this version does not know is skipped and counted (a newer registry); a
malformed ``sighting`` entry is refused and counted on its own, so that one bad notice does not
hold back the page's records; anything else malformed rejects the whole page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imeisync.domain import fields
from imeisync.domain.errors import BadInput, Unavailable
from imeisync.domain.fields import (
    CASE_REF,
    LIFT_REASONS,
    OPENING_REASONS,
    REASON,
    REFERENCE_ID,
    operator_id,
    text,
)
from imeisync.domain.imei import is_key
from imeisync.domain.orders import parse_timestamp
from imeisync.domain.ranges import parse_wire_device

log = logging.getLogger(__name__)

class RegistryAnswerRejected(Unavailable):
    """The registry answered, but the answer cannot be trusted or understood; nothing applied."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(
            f"registry answer rejected: {message}",
            hint or "nothing was applied; if it persists, ask the registry's operators",
            code="registry_answer_rejected",
        )


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    change_id: str
    action: str  # insert | remove
    imei_key: str
    kind: str  # block | track
    reason: str
    at: str
    owner_id: str
    owner_country: str
    imei_key_last: str | None = None  # a range: imei_key..imei_key_last


@dataclass(frozen=True, slots=True)
class DisputeEntry:
    seq: int
    dispute_id: str
    imei_key: str
    owner_id: str
    owner_country: str
    filer_id: str
    filer_country: str
    case_ref: str
    reason: str
    at: str


@dataclass(frozen=True, slots=True)
class DisputeAnswerEntry:
    seq: int
    dispute_id: str
    imei_key: str
    owner_id: str
    owner_country: str
    answer: str  # lifted | upheld
    reason: str
    at: str


@dataclass(frozen=True, slots=True)
class SightingEntry:
    """One of the owner's tracked devices seen on ``reporter_id``'s network at ``at``."""

    seq: int
    notice_id: str
    imei_key: str
    owner_id: str
    owner_country: str
    reporter_id: str
    reporter_country: str
    at: str


Entry = Change | DisputeEntry | DisputeAnswerEntry | SightingEntry


@dataclass(frozen=True)
class FeedPage:
    after: int
    next: int
    head: int
    more: bool
    entries: list[Entry]
    skipped: int = 0  # entries of a type this client does not know (newer registry)
    # malformed sighting entries, refused one by one: a notice is news for the police, not a
    # record, so one bad notice must not hold the page's records back
    refused_sightings: int = 0


# -- checking a feed page ------------------------------------------------------------------


def _bad(index: int, message: str) -> RegistryAnswerRejected:
    return RegistryAnswerRejected(f"feed entry #{index + 1}: {message}")


def _text(entry: dict[str, Any], name: str, index: int, limit: int = 2000) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(index, f"{name} missing or not text")
    return value


def _field(index: int, check: Callable[..., str], *args: Any) -> str:
    """A field rule of ``domain.fields``, its refusal naming the feed entry."""
    try:
        return check(*args)
    except BadInput as error:
        raise _bad(index, error.message) from None


def _owner(entry: dict[str, Any], index: int, name: str = "owner",
           country: str = "country") -> tuple[str, str]:
    return (_field(index, operator_id, entry.get(name), name),
            _field(index, fields.country, entry.get(country), country))


def _key(entry: dict[str, Any], index: int) -> str:
    key = entry.get("imei")
    if not is_key(key):
        raise _bad(index, f"imei {str(key)[:20]!r} is not a 14-digit IMEI key")
    return key


def _at(entry: dict[str, Any], index: int) -> str:
    at = _text(entry, "at", index, 40)
    try:
        parse_timestamp(at, "at")
    except BadInput:
        raise _bad(index, f"at {at!r} is not an RFC 3339 time") from None
    return at


def parse_feed_page(data: Any, after: int, limit: int) -> FeedPage:
    """Check a feed page completely before anything of it is applied."""
    if not isinstance(data, dict):
        raise RegistryAnswerRejected("the feed page is not a JSON object")
    entries_raw = data.get("entries")
    nxt, head, more = data.get("next"), data.get("head"), data.get("more")
    if not isinstance(entries_raw, list) or len(entries_raw) > limit:
        raise RegistryAnswerRejected("the feed page has no entry list, or more than asked for")
    if data.get("after") != after:
        raise RegistryAnswerRejected(f"asked for changes after {after}, got a page after "
                                     f"{str(data.get('after'))[:20]}")
    if (not isinstance(nxt, int) or isinstance(nxt, bool) or not isinstance(head, int)
            or not isinstance(more, bool)):
        raise RegistryAnswerRejected("the feed page lacks next/head/more")
    entries: list[Entry] = []
    last = after
    skipped = refused = 0
    for index, entry in enumerate(entries_raw):
        if not isinstance(entry, dict):
            raise _bad(index, "not a JSON object")
        seq = entry.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise _bad(index, "seq missing")
        if seq <= last:
            raise RegistryAnswerRejected(
                f"sequence numbers go backwards or repeat ({seq} after {last})",
                "the feed position was not moved; if it persists, ask the registry's operators")
        last = seq
        kind = entry.get("type")
        if kind == "change":
            change_id = _text(entry, "change_id", index, 80)
            if not REFERENCE_ID.fullmatch(change_id):
                raise _bad(index, "change_id is malformed")
            action = entry.get("action")
            if action not in ("insert", "remove"):
                raise _bad(index, f"action {str(action)[:16]!r} is not insert or remove")
            record_kind = entry.get("kind", "block")
            if record_kind not in ("block", "track"):
                raise _bad(index, f"kind {str(record_kind)[:16]!r} is not block or track")
            reason = _text(entry, "reason", index, 32)
            if reason not in (OPENING_REASONS if action == "insert" else LIFT_REASONS):
                raise _bad(index, f"reason {reason!r} is not known for {action}")
            owner, country = _owner(entry, index)
            try:
                key, key_last = parse_wire_device(entry)
            except BadInput as error:
                raise _bad(index, error.message) from None
            entries.append(Change(seq, change_id, action, key, record_kind,
                                  reason, _at(entry, index), owner, country, key_last))
        elif kind == "dispute":
            owner, country = _owner(entry, index)
            filer, filer_country = _owner(entry, index, "filer", "filer_country")
            entries.append(DisputeEntry(
                seq, _text(entry, "dispute_id", index, 80), _key(entry, index), owner, country,
                filer, filer_country, _field(index, text, entry.get("case_ref"), CASE_REF),
                _field(index, text, entry.get("reason"), REASON), _at(entry, index)))
        elif kind == "dispute_answer":
            owner, country = _owner(entry, index)
            answer = entry.get("answer")
            if answer not in ("lifted", "upheld"):
                raise _bad(index, "answer is not lifted or upheld")
            entries.append(DisputeAnswerEntry(
                seq, _text(entry, "dispute_id", index, 80), _key(entry, index), owner, country,
                answer, _field(index, text, entry.get("reason"), REASON), _at(entry, index)))
        elif kind == "sighting":
            try:
                entries.append(_sighting(entry, index, seq))
            except RegistryAnswerRejected as exc:
                refused += 1
                log.warning("sighting feed entry at %d refused: %s", seq, exc.message)
        elif isinstance(kind, str):
            skipped += 1  # a newer registry's entry type: not ours to apply
        else:
            raise _bad(index, "type missing")
    if nxt < last or nxt < after or head < nxt:
        raise RegistryAnswerRejected(
            f"the page's next position {nxt} is behind its entries or ahead of head {head}")
    return FeedPage(after, nxt, head, more, entries, skipped, refused)


def _sighting(entry: dict[str, Any], index: int, seq: int) -> SightingEntry:
    owner, country = _owner(entry, index)
    reporter, reporter_country = _owner(entry, index, "reporter", "reporter_country")
    notice_id = _text(entry, "notice_id", index, 80)
    if not REFERENCE_ID.fullmatch(notice_id):
        raise _bad(index, "notice_id is malformed")
    return SightingEntry(seq, notice_id, _key(entry, index), owner, country, reporter,
                         reporter_country, _at(entry, index))
