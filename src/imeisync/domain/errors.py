"""The three ways imeisync says no, shared by every layer.

Each carries one line for the person (what was wrong) and, where there is one, what to do.
The CLI maps them to exit codes 2 / 1 / 3 (CONTRACT.md); the HTTP layers to 400 / 422 / 503.
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


class Unavailable(ImeisyncError):
    """Something we depend on is down or unwritable (database, registry). Exit 3."""

    exit_code = 3
