"""The three ways imeisync says no, shared by every layer.

Each carries one line for the person (what was wrong) and, where there is one, what to do.
The CLI maps them to exit codes 2 / 1 / 3 (CONTRACT.md); the HTTP layers to 400 / 422 / 503
(``entrypoints/http.py``, where the kinds of refusal below get 403 / 404 / 409). A fourth,
:class:`InternalError`, is not a "no" but a bug caught at the edge: exit 70 / HTTP 500.
"""

from __future__ import annotations


class ImeisyncError(Exception):
    """Base: a message for people, never a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, code: str | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code  # a short machine-readable reason, e.g. "replayed_order_id"
        self.field = field  # the input field it is about, where there is one (forms use it)

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class BadInput(ImeisyncError):
    """The input itself is malformed (usage, IMEI, file, JSON, JWS, config). Exit 2."""

    exit_code = 2


class Refused(ImeisyncError):
    """Well-formed, but a rule says no (not the owner, not authorised, replay, conflict). Exit 1."""

    exit_code = 1


class NotAllowed(Refused):
    """The caller may not do this: its token's role does not grant it, or (registry) it is not
    the member the rule names, such as the record's owner answering a dispute. HTTP 403."""


class NotFound(Refused):
    """The thing asked for (an order, a dispute) does not exist here. HTTP 404."""


class Conflict(Refused):
    """Clashes with what is already there: a replayed order id, a dispute already answered
    differently. HTTP 409."""


class TooMany(Refused):
    """Over a rate limit (``adapters/rate_limit.py``): HTTP 429 with ``Retry-After``."""

    def __init__(self, message: str, hint: str, retry_after: int, *,
                 code: str = "rate_limited"):
        super().__init__(message, hint, code=code)
        self.retry_after = retry_after  # whole seconds


class Unavailable(ImeisyncError):
    """Something we depend on is down or unwritable (database, registry). Exit 3."""

    exit_code = 3


class InternalError(ImeisyncError):
    """An unexpected exception (a bug), caught at the edge and told in one line. Exit 70
    (EX_SOFTWARE, sysexits.h), so scripts can tell a bug from a rule's refusal (1)."""

    exit_code = 70
