"""The attach verdict (TS 29.511 EquipmentStatus), decided in one place.

Any open blocking record blacklists the device, whoever owns it; only tracking records
greylist it; an IMEI+IMSI exception lets that one subscriber through a block (the legitimate
user of a cloned IMEI). No record at all is "unknown": the caller maps it by configuration,
except that a device whose TAC is missing from a loaded TAC table may be greylisted or
blacklisted by policy (``[eir] unknown_tac``, DIRBS' "GSMA not found": a typo or a forged IMEI).
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    WHITELISTED = "WHITELISTED"
    BLACKLISTED = "BLACKLISTED"
    GREYLISTED = "GREYLISTED"
    UNKNOWN = "UNKNOWN"  # no record: answered per [eir] unknown_status


UNKNOWN_TAC_POLICIES = ("ignore", "grey", "black")
_UNKNOWN_TAC_STATUS = {"grey": Status.GREYLISTED, "black": Status.BLACKLISTED}


def verdict(
    *, blocked: bool, tracked: bool, excepted: bool = False, tac_unknown: bool = False,
    unknown_tac: str = "ignore",
) -> Status:
    """The status of a device; ``tac_unknown`` means a TAC table is loaded and lacks its TAC.

    >>> verdict(blocked=False, tracked=False, tac_unknown=True, unknown_tac="grey")
    <Status.GREYLISTED: 'GREYLISTED'>
    >>> verdict(blocked=True, tracked=False, excepted=True, tac_unknown=True, unknown_tac="black")
    <Status.WHITELISTED: 'WHITELISTED'>
    """
    if blocked:
        return Status.WHITELISTED if excepted else Status.BLACKLISTED
    if tracked:
        return Status.GREYLISTED
    if tac_unknown:
        return _UNKNOWN_TAC_STATUS.get(unknown_tac, Status.UNKNOWN)
    return Status.UNKNOWN


def network_answer(status: Status, unknown_status: str) -> str:
    """What the network is told: an unknown device is WHITELISTED or NOT_FOUND by configuration."""
    return unknown_status if status is Status.UNKNOWN else str(status)
