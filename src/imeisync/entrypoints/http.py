"""HTTP plumbing shared by imeisync's Starlette apps: the police API and the web console (the
``[api]`` listener, assembled in ``entrypoints/api.py``) and the reference registry.

One mapping from imeisync's errors to HTTP statuses, by kind (CONTRACT.md):

=====  ===========================================================================
400    ``BadInput``: malformed (JSON, JWS, IMEI, a field)
403    ``NotAllowed``: the caller's role, or membership, does not allow it
404    ``NotFound``: no such order or dispute
409    ``Conflict``: a replayed ``order_id``, a dispute already answered otherwise
422    ``Refused``: refused by a rule (not the owner, no open record, bad signature)
429    ``TooMany``: over a rate limit (``Retry-After``: when to try again)
500    ``InternalError``: a bug
503    ``Unavailable``: the database (or the registry) is down (``Retry-After``)
=====  ===========================================================================

One RFC 9457 ``application/problem+json`` body (``type``, ``title``, ``status``, ``detail``,
``code``, ``hint``); the request body read under a limit (413 past it); the media type; the
client's address. The attach check (``entrypoints/eir.py``) answers in TS 29.571's own
ProblemDetails (``cause``) and keeps its prebuilt responses.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from imeisync.domain.errors import (
    BadInput,
    Conflict,
    ImeisyncError,
    InternalError,
    NotAllowed,
    NotFound,
    TooMany,
    Unavailable,
)

PROBLEM = "application/problem+json"
PROBLEM_BASE = "https://imeisync.invalid/problems/"
MAX_BODY = 128 * 1024  # the [api] listener's bodies: a signed order is at most 64 KiB
RETRY_AFTER = "30"  # seconds, on 503: long enough for a database restart to show

TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
          405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
          415: "Unsupported Media Type", 422: "Unprocessable Content",
          429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
_DEFAULT_CODES = {400: "malformed", 403: "forbidden", 404: "not_found", 409: "conflict",
                  422: "refused", 429: "rate_limited", 500: "internal", 503: "unavailable"}


def status_of(error: ImeisyncError) -> int:
    """The HTTP status for one of imeisync's errors (the table above)."""
    if isinstance(error, BadInput):
        return 400
    if isinstance(error, NotAllowed):
        return 403
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Conflict):
        return 409
    if isinstance(error, TooMany):
        return 429
    if isinstance(error, Unavailable):
        return 503
    if isinstance(error, InternalError):
        return 500
    return 422


class Problem(Exception):
    """An HTTP error: raised by handlers, rendered as problem+json (API, registry) or as a
    page (console)."""

    def __init__(self, status: int, detail: str, code: str | None = None,
                 hint: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.code, self.hint = status, detail, code, hint
        self.headers = headers or {}

    @classmethod
    def of(cls, error: ImeisyncError, default_code: str | None = None) -> Problem:
        """``error`` as a problem: its status by kind, its code (else ``default_code``, else
        one per status), its message and hint."""
        status = status_of(error)
        code = error.code or default_code or _DEFAULT_CODES[status]
        headers = ({"Retry-After": RETRY_AFTER} if status == 503 else
                   {"Retry-After": str(error.retry_after)} if isinstance(error, TooMany) else None)
        return cls(status, error.message, code, error.hint, headers)

    def body(self) -> bytes:
        data: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code.replace("_", "-") if self.code else "about:blank",
            "title": TITLES.get(self.status, "Error"), "status": self.status,
            "detail": self.detail}
        if self.code:
            data["code"] = self.code
        if self.hint:
            data["hint"] = self.hint
        return json.dumps(data, ensure_ascii=False).encode()

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, media_type=PROBLEM,
                        headers=self.headers)


async def read_body(request: Request, limit: int = MAX_BODY, hint: str | None = None) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = Problem(413, f"the request body is over the {limit}-byte limit", "too_large",
                        hint)
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "the Content-Length header is not a number", "malformed")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    request._body = bytes(body)  # later request.form()/json() read this copy
    return bytes(body)


def media_type(request: Request) -> str:
    """The Content-Type without parameters, in lower case ('' when there is none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
