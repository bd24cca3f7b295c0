"""The web console's dispute pages: the list, filing a dispute about another operator's record,
and answering one about ours (uphold with a reason, or lift with the police order)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.responses import Response

from imeisync.domain.errors import BadInput, ImeisyncError
from imeisync.domain.roles import Permission
from imeisync.entrypoints.console_base import MALFORMED, Page, _form_status, _token_text, field_of


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
