"""The web console for police liaison staff: server-rendered pages, no JavaScript.

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
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, ImeisyncError, NotAllowed, Unavailable
from imeisync.domain.fields import LIFT_REASONS, OPENING_REASONS
from imeisync.domain.imei import InvalidImei, parse_typed
from imeisync.domain.roles import Permission, allowed
from imeisync.entrypoints.http import (
    MAX_BODY,
    Problem,
    client_address,
    media_type,
    read_body,
    status_of,
)
from imeisync.entrypoints.http_auth import Gate, Throttled
from imeisync.services import audit
from imeisync.services.liaison import Caller, LiaisonDesk
from imeisync.services.sync.receipts import overdue as overdue_lifts
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
            return self.set_cookie(request, response, visit)

        return endpoint

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
        except Unavailable as exc:
            return _error(page, 503, "The system is not available right now",
                          f"{exc.message}. Nothing was changed. Try again in a minute; if "
                          "this persists, tell the operations team.")
        except ImeisyncError as exc:
            return _error(page, status_of(exc), "That could not be done", str(exc))


class _Refuse(Exception):
    """Stop before the handler: a page with a status, a heading and what to do."""

    def __init__(self, status: int, title: str, text: str):
        super().__init__(title)
        self.status, self.title, self.text = status, title, text

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


# -- handlers ------------------------------------------------------------------------------


def home(page: Page) -> Response:
    overdue = []
    if page.can(Permission.READ_CASES):
        with page.console.app.db.read() as session:
            overdue = overdue_lifts(session)
    return page.render("home.html", title="Start", overdue=overdue)


def signin_form(page: Page) -> Response:
    if page.visit.caller is not None:
        return page.redirect("/")
    return page.render("signin.html", title="Sign in",
                       next=_safe_next(page.request.query_params.get("next")),
                       signed_out=page.request.query_params.get("signed_out") == "1")


def _safe_next(target: str | None) -> str:
    """A path on this console to go to after signing in; anything else (another site, a
    scheme, ``//host``, backslashes or control characters browsers would drop) is ``/``."""
    if (not target or not target.startswith("/") or target.startswith("//") or len(target) > 500
            or any(c == "\\" or not c.isprintable() or c.isspace() for c in target)):
        return "/"
    return target


def signin(page: Page) -> Response:
    request = page.request
    presented = page.form.get("token", "").strip()
    target = _safe_next(page.form.get("next"))
    client = client_address(request)
    if not presented:
        return page.render("signin.html", MALFORMED, title="Sign in", next=target, signed_out=False,
                           errors={"token": "Enter your token. It starts with isk_ and was "
                                            "given to you by your administrator."})
    try:
        info = page.console.gate.check(presented, client, "console")
    except Throttled as exc:
        minutes = max(1, round(exc.retry_after / 60))
        return page.render("signin.html", 429, title="Sign in", next=target, signed_out=False,
                           errors={"token": f"Too many failed sign-ins from this computer. "
                                            f"Wait {minutes} minute(s) and try again."})
    if info is None:
        return page.render("signin.html", 401, title="Sign in", next=target, signed_out=False,
                           errors={"token": "That token was not recognised. Check that you "
                                            "copied all of it (it starts with isk_), or ask "
                                            "your administrator for a new one."})
    if not allowed(info.role, Permission.USE_CONSOLE):
        return page.render("signin.html", 403, title="Sign in", next=target, signed_out=False,
                           errors={"token": f"This is a {info.role} token, which cannot sign in "
                                            "to the console. Use your personal liaison token."})
    page.visit.session = {"c": secrets.token_urlsafe(24), "t": int(time.time()),
                          "n": info.name, "f": info.fingerprint}
    page.visit.dirty = True
    try:
        with page.console.app.db.write() as session:
            audit.append(session, [audit.Event(
                actor=info.name, role=info.role, action="console.signin", outcome="ok",
                at=_now(), detail={"client": client})])
    except ImeisyncError as exc:
        log.warning("console: sign-in of %s not recorded: %s", info.name, exc)
    return page.redirect(target)


def signout(page: Page) -> Response:
    page.visit.session = anonymous()
    page.visit.dirty = True
    return page.redirect("/signin?signed_out=1")


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


# orders -------------------------------------------------------------------------------------

BLOCK_FIELDS = ("imei", "imei_last", "case_ref", "police_unit", "reason", "note")


def block_form(page: Page) -> Response:
    page.desk.require(page.caller, Permission.SUBMIT_ORDER)
    values = {"imei": page.request.query_params.get("imei", "")}
    return page.render("block.html", title="Submit a block", values=values)


def block(page: Page) -> Response:
    values = {name: page.form.get(name, "").strip() for name in BLOCK_FIELDS}
    values["unknown_tac_ok"] = page.form.get("unknown_tac_ok", "")
    errors: dict[str, str] = {}
    if not values["imei"]:
        errors["imei"] = ("Enter the IMEI: the 15 digits shown by dialling *#06# or printed on "
                          "the box.")
    else:
        try:
            parse_typed(values["imei"])
        except InvalidImei as exc:
            errors["imei"] = str(exc)
    if values["imei_last"]:
        try:
            parse_typed(values["imei_last"])
        except InvalidImei as exc:
            errors["imei_last"] = str(exc)
    if not values["case_ref"]:
        errors["case_ref"] = "Enter the police case reference from the report."
    if not values["police_unit"]:
        errors["police_unit"] = "Enter the police unit that made the report."
    if values["reason"] not in OPENING_REASONS:
        errors["reason"] = "Choose why the device is being blocked."
    status = MALFORMED if errors else 200
    if not errors:
        payload: dict[str, Any] = {k: v for k, v in values.items()
                                   if v and k not in ("note", "unknown_tac_ok", "imei_last")}
        if values["imei_last"]:  # a shipment: the range imei .. imei_last
            payload["imei_range"] = {"first": payload.pop("imei"), "last": values["imei_last"]}
        if values["note"]:
            payload["note"] = values["note"]
        payload["unknown_tac_ok"] = values["unknown_tac_ok"] == "yes"
        try:
            outcome = page.desk.submit_block(page.caller, payload)
        except ImeisyncError as exc:
            status = _form_status(exc)
            field = "imei_last" if (exc.field or "").startswith("imei_range") else None
            errors[field or field_of(exc, BLOCK_FIELDS)] = str(exc)
        else:
            return page.redirect(f"/orders/{quote(outcome.order_id, safe='')}?new=1")
    return page.render("block.html", status, title="Submit a block", values=values,
                       errors=errors)


def upload_form(page: Page) -> Response:
    page.desk.require(page.caller, Permission.SUBMIT_ORDER)
    return page.render("upload.html", title="Upload a signed order")


def upload(page: Page) -> Response:
    errors: dict[str, str] = {}
    status = MALFORMED
    try:
        token = _token_text(page)
        if not token:
            errors["order_file"] = ("Choose the signed order file the police sent (.jws), or "
                                    "paste its text in the box below.")
        else:
            outcome = page.desk.submit_signed(page.caller, token)
            return page.redirect(f"/orders/{quote(outcome.order_id, safe='')}?new=1")
    except ImeisyncError as exc:
        status = _form_status(exc)
        errors["order_file"] = str(exc)
    return page.render("upload.html", status, title="Upload a signed order", errors=errors,
                       values={"order_text": page.form.get("order_text", "")})


def orders(page: Page) -> Response:
    everyone = page.request.query_params.get("all") == "1"
    rows = page.desk.orders(page.caller, mine=not everyone, limit=100)
    return page.render("orders.html", title="Orders", orders=rows, everyone=everyone)


def receipt(page: Page) -> Response:
    order_id = page.request.path_params["order_id"]
    row = page.desk.receipt(page.caller, order_id)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in order_id)[:100]
    return Response(row.jws + "\n", media_type="application/jose", headers={
        "Content-Disposition": f'attachment; filename="receipt-{name}.jws"'})


def order(page: Page) -> Response:
    view = page.desk.order(page.caller, page.request.path_params["order_id"])
    return page.render("order.html", title=f"Order {view['order_id']}", order=view,
                       new=page.request.query_params.get("new") == "1")


# devices ------------------------------------------------------------------------------------


def lookup(page: Page) -> Response:
    text = page.request.query_params.get("imei", "").strip()
    if not text:
        page.desk.require(page.caller, Permission.READ_CASES)
        return page.render("lookup.html", title="Look up a device", device=None,
                           values={"imei": ""})
    try:
        device = page.desk.device(page.caller, text)
    except BadInput as exc:
        return page.render("lookup.html", MALFORMED, title="Look up a device", device=None,
                           values={"imei": text}, errors={"imei": str(exc)})
    return page.render("lookup.html", title=f"Device {device['imei']}", device=device,
                       values={"imei": text})


# disputes -----------------------------------------------------------------------------------


def disputes(page: Page) -> Response:
    rows = page.desk.disputes(page.caller)
    return page.render(
        "disputes.html", title="Disputes",
        waiting=[d for d in rows if d["direction"] == "received" and d["state"] == "open"],
        filed=[d for d in rows if d["direction"] == "filed"],
        answered=[d for d in rows if d["direction"] == "received" and d["state"] != "open"])


DISPUTE_FIELDS = ("imei", "owner", "case_ref", "reason")


def _owners(page: Page, imei: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Foreign operators with an open record of ``imei`` (for the owner choice)."""
    if not imei:
        return [], None
    try:
        device = page.desk.device(page.caller, imei)
    except BadInput:
        return [], None
    owners = [r for r in device["foreign_records"] if r["closed_at"] is None]
    return owners, device


def dispute_form(page: Page) -> Response:
    page.desk.require(page.caller, Permission.FILE_DISPUTE)
    imei = page.request.query_params.get("imei", "").strip()
    owners, device = _owners(page, imei)
    values = {"imei": imei, "owner": owners[0]["owner"] if len(owners) == 1 else ""}
    return page.render("dispute_new.html", title="File a dispute", values=values,
                       owners=owners, device=device)


def dispute_file(page: Page) -> Response:
    values = {name: page.form.get(name, "").strip() for name in DISPUTE_FIELDS}
    errors: dict[str, str] = {}
    if not values["imei"]:
        errors["imei"] = "Enter the IMEI of the wrongly blocked device (15 digits)."
    if not values["case_ref"]:
        errors["case_ref"] = ("Enter your police case reference: the case in which the police "
                              "found the block to be wrong.")
    if not values["reason"]:
        errors["reason"] = ("Say why the block is wrong, in a sentence the other operator's "
                            "staff can act on. Do not write the owner's name.")
    status = MALFORMED
    if not errors:
        try:
            result = page.desk.file_dispute(page.caller, values["imei"], values["case_ref"],
                                            values["reason"], values["owner"] or None)
        except ImeisyncError as exc:
            status = _form_status(exc)
            errors[field_of(exc, DISPUTE_FIELDS)] = str(exc)
        else:
            return page.redirect(f"/disputes/{quote(result['dispute_id'], safe='')}?new=1")
    owners, device = _owners(page, values["imei"]) if "imei" not in errors else ([], None)
    return page.render("dispute_new.html", status, title="File a dispute", values=values,
                       errors=errors, owners=owners, device=device)


def dispute(page: Page, **context: Any) -> Response:
    view = page.desk.dispute(page.caller, page.request.path_params["dispute_id"])
    status = context.pop("status", 200)
    return page.render("dispute.html", status, title="Dispute", dispute=view,
                       new=page.request.query_params.get("new") == "1", **context)


def dispute_uphold(page: Page) -> Response:
    dispute_id = page.request.path_params["dispute_id"]
    reason = page.form.get("reason", "").strip()
    if not reason:
        return dispute(page, status=MALFORMED, errors={
            "reason": "Say why the block stands (for example: the police confirm the theft), "
                      "so the other operator can tell its customer."})
    try:
        page.desk.uphold(page.caller, dispute_id, reason)
    except ImeisyncError as exc:
        return dispute(page, status=_form_status(exc), errors={"reason": str(exc)},
                       values={"reason": reason})
    return page.redirect(f"/disputes/{quote(dispute_id, safe='')}?answered=upheld")


def dispute_lift(page: Page) -> Response:
    dispute_id = page.request.path_params["dispute_id"]
    try:
        token = _token_text(page)
        if not token:
            return dispute(page, status=MALFORMED, errors={
                "order_file": "Choose the police's signed lift order (.jws), or paste its "
                              "text in the box."})
        outcome = page.desk.lift_for_dispute(page.caller, dispute_id, token)
    except ImeisyncError as exc:
        return dispute(page, status=_form_status(exc), errors={"order_file": str(exc)})
    return page.redirect(f"/orders/{quote(outcome.order_id, safe='')}?new=1")


# -- wiring ------------------------------------------------------------------------------------


def routes(app: App, gate: Gate) -> list[BaseRoute]:
    from imeisync.entrypoints.console_notices import notice_apply, notice_form

    console = Console(app, gate)
    p = console.page
    return [
        Route("/notices", p(notice_form), methods=["GET"]),
        Route("/notices", p(notice_apply), methods=["POST"]),
        Route("/", p(home), methods=["GET"]),
        Route("/signin", p(signin_form, signed_in=False), methods=["GET"]),
        Route("/signin", p(signin, signed_in=False), methods=["POST"]),
        Route("/signout", p(signout, signed_in=False), methods=["POST"]),
        Route("/block", p(block_form), methods=["GET"]),
        Route("/block", p(block), methods=["POST"]),
        Route("/upload", p(upload_form), methods=["GET"]),
        Route("/upload", p(upload), methods=["POST"]),
        Route("/lookup", p(lookup), methods=["GET"]),
        Route("/orders", p(orders), methods=["GET"]),
        Route("/receipts/{order_id:path}", p(receipt), methods=["GET"]),
        Route("/orders/{order_id:path}", p(order), methods=["GET"]),
        Route("/disputes", p(disputes), methods=["GET"]),
        Route("/disputes/new", p(dispute_form), methods=["GET"]),
        Route("/disputes/new", p(dispute_file), methods=["POST"]),
        Route("/disputes/{dispute_id}", p(dispute), methods=["GET"]),
        Route("/disputes/{dispute_id}/uphold", p(dispute_uphold), methods=["POST"]),
        Route("/disputes/{dispute_id}/lift", p(dispute_lift), methods=["POST"]),
    ]


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
