"""The attach verdict (TS 29.511 EquipmentStatus), decided in one place.

Any open blocking record blacklists the device, whoever owns it; only tracking records
greylist it; an IMEI+IMSI exception lets that one subscriber through a block (the legitimate
user of a cloned IMEI). No record at all is "unknown": the caller maps it by configuration.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    WHITELISTED = "WHITELISTED"
    BLACKLISTED = "BLACKLISTED"
    GREYLISTED = "GREYLISTED"
    UNKNOWN = "UNKNOWN"  # no record: answered per [eir] unknown_status


def verdict(*, blocked: bool, tracked: bool, excepted: bool = False) -> Status:
    if blocked:
        return Status.WHITELISTED if excepted else Status.BLACKLISTED
    if tracked:
        return Status.GREYLISTED
    return Status.UNKNOWN


def network_answer(status: Status, unknown_status: str) -> str:
    """What the network is told: an unknown device is WHITELISTED or NOT_FOUND by configuration."""
    return unknown_status if status is Status.UNKNOWN else str(status)
