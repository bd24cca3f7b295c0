"""The rule that governs everything: only the operator that reported a device may remove its
record, and (locally) only at the police's request.

Written once, here; the daemon's order intake and the reference registry both call
``decide_removal`` so that the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Protocol, TypeVar


class RecordLike(Protocol):
    """What the rule needs to know of an open record; store rows and registry rows both fit."""

    @property
    def owner_id(self) -> str: ...

    @property
    def owner_country(self) -> str: ...


class RemovalOutcome(StrEnum):
    ALLOWED = "allowed"  # the requester owns an open record: it may close it
    NOT_OWNER = "not_owner"  # open records exist, all owned by others (GSMA 0002)
    NO_RECORD = "no_record"  # nothing open for this device (GSMA 0003)


R = TypeVar("R", bound=RecordLike)


@dataclass(frozen=True)
class RemovalDecision(Generic[R]):
    outcome: RemovalOutcome
    own: tuple[R, ...] = ()  # the requester's open records (what a removal closes)
    others: tuple[R, ...] = ()  # other operators' open records (what stays)

    @property
    def allowed(self) -> bool:
        return self.outcome is RemovalOutcome.ALLOWED

    def owners_text(self) -> str:
        """'op-b (SE), op-c (NO)': who the police must ask instead."""
        seen = dict.fromkeys(f"{r.owner_id} ({r.owner_country})" for r in self.others)
        return ", ".join(seen)


def decide_removal(open_records: Iterable[R], requester: str) -> RemovalDecision[R]:
    """May ``requester`` remove its record among these open records for one device?"""
    own: list[R] = []
    others: list[R] = []
    for record in open_records:
        (own if record.owner_id == requester else others).append(record)
    if own:
        return RemovalDecision(RemovalOutcome.ALLOWED, tuple(own), tuple(others))
    if others:
        return RemovalDecision(RemovalOutcome.NOT_OWNER, (), tuple(others))
    return RemovalDecision(RemovalOutcome.NO_RECORD)
