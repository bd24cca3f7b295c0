"""The web console for police liaison staff: server-rendered pages, no JavaScript.

This module holds the order and look-up pages and the routes; the machinery (sessions, CSRF,
error pages) is ``console_base``, the other pages ``console_disputes`` and ``console_notices``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import quote

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, ImeisyncError, TooMany
from imeisync.domain.fields import OPENING_REASONS
from imeisync.domain.imei import InvalidImei, parse_typed
from imeisync.domain.roles import Permission, allowed
from imeisync.entrypoints.console_base import (
    COOKIE,
    MALFORMED,
    Console,
    Page,
    _form_status,
    _token_text,
    anonymous,
    error_page,
    field_of,
    http_error,
    log,
)
from imeisync.entrypoints.console_disputes import (
    dispute,
    dispute_file,
    dispute_form,
    dispute_lift,
    dispute_uphold,
    disputes,
)
from imeisync.entrypoints.console_notices import notice_apply, notice_form
from imeisync.entrypoints.console_sightings import disclose, sighting, sightings
from imeisync.entrypoints.http import client_address
from imeisync.entrypoints.http_auth import Gate
from imeisync.services import audit
from imeisync.services.sync.receipts import overdue as overdue_lifts

__all__ = ["COOKIE", "MALFORMED", "Page", "error_page", "http_error", "routes"]


# -- handlers ------------------------------------------------------------------------------


def home(page: Page) -> Response:
    overdue = []
    if page.can(Permission.READ_CASES):
        with page.console.app.db.read() as session:
            overdue = overdue_lifts(session)
    new_sightings = page.console.app.sighting_cases().new_count(page.caller)  # last 7 days
    return page.render("home.html", title="Start", overdue=overdue, new_sightings=new_sightings)


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
    except TooMany as exc:
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


# -- wiring ------------------------------------------------------------------------------------


def routes(app: App, gate: Gate) -> list[BaseRoute]:
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
        Route("/sightings", p(sightings), methods=["GET"]),
        Route("/sightings/{sighting_id}", p(sighting), methods=["GET"]),
        Route("/sightings/{sighting_id}/disclosure", p(disclose), methods=["POST"]),
        Route("/disputes", p(disputes), methods=["GET"]),
        Route("/disputes/new", p(dispute_form), methods=["GET"]),
        Route("/disputes/new", p(dispute_file), methods=["POST"]),
        Route("/disputes/{dispute_id}", p(dispute), methods=["GET"]),
        Route("/disputes/{dispute_id}/uphold", p(dispute_uphold), methods=["POST"]),
        Route("/disputes/{dispute_id}/lift", p(dispute_lift), methods=["POST"]),
    ]
