"""The web console's machinery: sessions, CSRF, the page a handler gets, the guard that turns
errors into pages, and the error pages. The handlers live in ``console`` (orders, look-ups),
``console_disputes`` and ``console_notices``.

Sign-in is with a personal token (``imeisync token add --role liaison``; auditors may sign in
and read). The session is a cookie signed with HMAC-SHA256 under the secret kept in the tokens
file; it holds the token's *name* and a fingerprint of its hash, never the token, and is checked
against the tokens file on every request, so revoking a token ends its sessions at once. The
cookie is ``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the console is served over TLS,
and expires after ``SESSION_HOURS``.

Every form carries a CSRF token (the session's, compared in constant time); a post without it
is refused before anything else is looked at. Pages are rendered by Jinja2 with autoescape on:
whatever a person or another operator wrote is shown as text, never markup. Errors say what was
wrong and what to do, next to the field they concern (``aria-describedby``) and in a summary
at the top of the page that takes the focus.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, ImeisyncError, NotAllowed, TooMany, Unavailable
from imeisync.domain.fields import LIFT_REASONS, OPENING_REASONS
from imeisync.domain.roles import Permission, allowed
from imeisync.entrypoints.http import (
    MAX_BODY,
    Problem,
    client_address,
    media_type,
    read_body,
    status_of,
)
from imeisync.entrypoints.http_auth import Gate
from imeisync.services.liaison import Caller, LiaisonDesk
from imeisync.web import environment

log = logging.getLogger("imeisync.console")

COOKIE = "imeisync_session"
SESSION_HOURS = 8

REASON_WORDS = {"stolen": "Stolen", "lost": "Lost", "fraud": "Obtained by fraud",
                "recovered": "Recovered", "wrongly_reported": "Wrongly reported",
                "other": "Other"}
STATE_WORDS = {
    "accepted": "Accepted here, waiting to be sent to the registry",
    "sent": "Sent to the registry, waiting for its answer",
    "confirmed": "Confirmed by the registry, waiting for the other operators to apply it",
    "applied": "Applied by some of the other operators, not yet by all",
    "applied_everywhere": "Applied by every operator that receives our records",
    "withdrawn": "Withdrawn before it left this operator",
    "rejected": "Rejected by the registry",
    "refused": "Refused (not applied)",
    "linked": "Linked to an existing record",
}

_env = environment()
_env.globals.update(reason_words=REASON_WORDS, state_words=STATE_WORDS)


# -- sessions ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signed session cookies: ``base64url(json).base64url(hmac)``."""

    def __init__(self, secret: Callable[[], bytes], *, max_age: int = SESSION_HOURS * 3600,
                 clock: Callable[[], float] = time.time):
        self._secret = secret
        self.max_age = max_age
        self.clock = clock

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret(), b"console-session:" + payload.encode(),
                             hashlib.sha256).digest())

    def dump(self, data: dict[str, Any]) -> str:
        payload = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def load(self, cookie: str | None) -> dict[str, Any] | None:
        if not cookie or len(cookie) > 4096 or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        issued = data.get("t")
        if not isinstance(issued, int | float) or self.clock() - issued > self.max_age:
            return None
        return data


def anonymous(clock: Callable[[], float] = time.time) -> dict[str, Any]:
    return {"c": secrets.token_urlsafe(24), "t": int(clock())}


@dataclass
class Visit:
    session: dict[str, Any]
    caller: Caller | None
    dirty: bool  # the cookie must be (re)sent

    @property
    def csrf(self) -> str:
        return str(self.session["c"])


# -- pages -------------------------------------------------------------------------------------


@dataclass
class Page:
    """One request to the console: who, the form posted (if any), and how to answer."""

    console: Console
    request: Request
    visit: Visit
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def caller(self) -> Caller:
        assert self.visit.caller is not None
        return self.visit.caller

    @property
    def desk(self) -> LiaisonDesk:
        return self.console.app.desk()

    def can(self, permission: Permission) -> bool:
        return self.visit.caller is not None and allowed(self.visit.caller.role, permission)

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        caller = self.visit.caller
        waiting_count = 0
        if caller is not None:
            try:
                waiting_count = self.desk.waiting_disputes(caller)
            except ImeisyncError:
                waiting_count = 0
        base: dict[str, Any] = {
            "caller": caller, "csrf": self.visit.csrf, "operator": self.console.app.operator_id,
            "country": self.console.app.config.operator_country, "path": self.request.url.path,
            "waiting_count": waiting_count, "errors": {}, "values": {}, "summary": [],
            "can_submit": self.can(Permission.SUBMIT_ORDER),
            "can_dispute": self.can(Permission.FILE_DISPUTE),
            "can_answer": self.can(Permission.ANSWER_DISPUTE),
            "opening_reasons": OPENING_REASONS, "lift_reasons": LIFT_REASONS,
        }
        base.update(context)
        if base["errors"] and not base["summary"]:
            base["summary"] = [(name, message) for name, message in base["errors"].items()]
        html = _env.get_template(template).render(**base)
        return HTMLResponse(html, status_code=status)

    def redirect(self, url: str) -> Response:
        return RedirectResponse(url, status_code=303)


class Console:
    def __init__(self, app: App, gate: Gate):
        self.app = app
        self.gate = gate
        self.sessions = Sessions(lambda: gate.tokens.session_secret)

    # -- the request cycle -------------------------------------------------------------

    def visit(self, request: Request) -> Visit:
        data = self.sessions.load(request.cookies.get(COOKIE))
        if data is None:
            return Visit(anonymous(), None, True)
        name, fingerprint = data.get("n"), data.get("f")
        if not name:
            return Visit(data, None, False)
        info = self.gate.tokens.get(str(name))
        if info is None or info.fingerprint != fingerprint or not allowed(
                info.role, Permission.USE_CONSOLE):
            return Visit(anonymous(), None, True)  # revoked or replaced: signed out
        return Visit(data, Caller(info.name, info.role, "console"), False)

    def set_cookie(self, request: Request, response: Response, visit: Visit) -> Response:
        if visit.dirty:
            response.set_cookie(COOKIE, self.sessions.dump(visit.session),
                                max_age=SESSION_HOURS * 3600, path="/", httponly=True,
                                samesite="strict", secure=request.url.scheme == "https")
        return response

    def page(self, handler: Callable[[Page], Response], *, signed_in: bool = True
             ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            visit = self.visit(request)
            page = Page(self, request, visit)
            try:
                if visit.caller is not None:
                    self._admit(visit.caller)
                if request.method == "POST":
                    await self._read_form(page)
                if signed_in and visit.caller is None:
                    target = request.url.path + (f"?{request.url.query}"
                                                 if request.url.query else "")
                    response = page.redirect("/signin?" + urlencode({"next": target}))
                else:
                    response = await run_in_threadpool(self._guarded, handler, page)
            except _Refuse as refusal:
                response = await run_in_threadpool(refusal.render, page)
                response.headers.update(refusal.headers)
            return self.set_cookie(request, response, visit)

        return endpoint

    def _admit(self, caller: Caller) -> None:
        try:
            self.gate.admit(caller.name, "console")
        except TooMany as exc:
            raise _Refuse(429, "Too many requests", f"This console is answering you more slowly "
                          f"for a moment: wait {exc.retry_after} seconds, then reload the page.",
                          {"Retry-After": str(exc.retry_after)}) from None

    async def _read_form(self, page: Page) -> None:
        request = page.request
        try:
            await read_body(request, MAX_BODY)
        except Problem as problem:
            raise _Refuse(413 if problem.status == 413 else 400, "The form is too large",
                          "The form (with its file) is over 128 KB. A signed order is a small "
                          "text file; check that you chose the right file.") from None
        kind = media_type(request)
        if kind not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raise _Refuse(400, "This is not a form", "Use the forms of this console.")
        form = await request.form(max_files=2, max_fields=20, max_part_size=MAX_BODY)
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                content = await value.read()
                if content:
                    page.files[name] = content
            else:
                page.form[name] = value
        sent = page.form.get("csrf", "")
        if not (isinstance(sent, str) and hmac.compare_digest(sent.encode(),
                                                             page.visit.csrf.encode())):
            log.warning("console: form post to %s without a valid CSRF token from %s",
                        request.url.path, client_address(request))
            raise _Refuse(403, "This form could not be accepted",
                          "It has expired, or it did not come from this console. Go back, "
                          "reload the page and send the form again. (The console needs "
                          "cookies from this site to be allowed.)")

    def _guarded(self, handler: Callable[[Page], Response], page: Page) -> Response:
        try:
            return handler(page)
        except NotAllowed as exc:
            return _error(page, 403, "Your role cannot do this",
                          f"{exc.message}. {exc.hint or ''}")
        except TooMany as exc:
            response = _error(page, 429, "Too many requests", f"{exc.message}. {exc.hint}")
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        except Unavailable as exc:
            return _error(page, 503, "The system is not available right now",
                          f"{exc.message}. Nothing was changed. Try again in a minute; if "
                          "this persists, tell the operations team.")
        except ImeisyncError as exc:
            return _error(page, status_of(exc), "That could not be done", str(exc))


class _Refuse(Exception):
    """Stop before the handler: a page with a status, a heading and what to do."""

    def __init__(self, status: int, title: str, text: str,
                 headers: dict[str, str] | None = None):
        super().__init__(title)
        self.status, self.title, self.text = status, title, text
        self.headers = headers or {}

    def render(self, page: Page) -> Response:
        return _error(page, self.status, self.title, self.text)


def _error(page: Page, status: int, title: str, text: str) -> Response:
    return page.render("error.html", status, title=title, text=text)


# A form shown again with its errors answers with the status the API would give: 400 for what
# the console's own checks find missing or malformed, else the service's error's status.
MALFORMED = 400


def _form_status(exc: ImeisyncError) -> int:
    """The status of a service's error shown next to a form field. Not allowed and
    unavailable are page-wide (``Console._guarded``): re-raised."""
    if isinstance(exc, NotAllowed | Unavailable):
        raise exc
    return status_of(exc)


def field_of(error: ImeisyncError, fields: tuple[str, ...]) -> str:
    """Which form field an error is about (the first field, if it names none of them)."""
    return error.field if error.field in fields else fields[0]


def _token_text(page: Page) -> str:
    """The signed order from the upload field or the text box."""
    raw = page.files.get("order_file")
    if raw is not None:
        try:
            return raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise BadInput("the chosen file is not a signed order (it is not plain text)",
                           "choose the .jws file the police sent") from None
    return page.form.get("order_text", "").strip()


async def error_page(request: Request, problem: Problem) -> Response:
    html = _env.get_template("error.html").render(
        caller=None, csrf="", operator="", country="", path=request.url.path, waiting_count=0,
        errors={}, values={}, summary=[], can_submit=False, can_dispute=False,
        can_answer=False, title="Something went wrong",
        text=f"{problem.detail}. {problem.hint or ''}")
    return HTMLResponse(html, status_code=problem.status)


async def http_error(request: Request, exc: HTTPException) -> Response:
    words = {404: ("Page not found", "Check the address, or use the links above."),
             405: ("That cannot be done here", "Use the forms of this console.")}
    title, text = words.get(exc.status_code, ("Something went wrong", str(exc.detail)))
    html = _env.get_template("error.html").render(
        caller=None, csrf="", operator="", country="", path=request.url.path, waiting_count=0,
        errors={}, values={}, summary=[], can_submit=False, can_dispute=False,
        can_answer=False, title=title, text=text)
    return HTMLResponse(html, status_code=exc.status_code, headers=exc.headers)
