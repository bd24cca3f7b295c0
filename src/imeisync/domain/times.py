"""Times as imeisync shows and exchanges them: RFC 3339 in UTC to the second, ``…Z``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Final, overload

# FROZEN: the audit log's hash chain covers each event's time written in exactly this form
# (services/audit.py). Changing it breaks verification of every stored chain.
AUDIT_HASH_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"


def audit_hash_time(moment: datetime) -> str:
    """An event's time as the audit hash covers it (FROZEN format, microseconds, ``Z``).

    >>> audit_hash_time(datetime(2026, 11, 21, 10, 0, tzinfo=UTC))
    '2026-11-21T10:00:00.000000Z'
    """
    return moment.strftime(AUDIT_HASH_TIME_FORMAT)


@overload
def rfc3339(moment: datetime | float) -> str: ...
@overload
def rfc3339(moment: None) -> None: ...
@overload
def rfc3339(moment: datetime | float | None) -> str | None: ...
def rfc3339(moment: datetime | float | None) -> str | None:
    """An aware datetime, or seconds since the epoch, as ``2026-11-21T10:00:00Z``.

    >>> rfc3339(0.0)
    '1970-01-01T00:00:00Z'
    """
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(moment: datetime) -> str:
    """An aware datetime to the microsecond, as the change feed carries it (push and registry).

    >>> rfc3339_micro(datetime(2026, 11, 21, 10, 0, 0, 5, tzinfo=UTC))
    '2026-11-21T10:00:00.000005Z'
    """
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_millis(epoch: float) -> str:
    """Seconds since the epoch to the millisecond (log lines, the attach index's snapshot time).

    >>> rfc3339_millis(60.25)
    '1970-01-01T00:01:00.250Z'
    """
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def epoch_of(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 text; None for anything else.

    >>> epoch_of("1970-01-01T00:01:00Z")
    60.0
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
