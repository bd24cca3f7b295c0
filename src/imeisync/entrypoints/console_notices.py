"""The console's page for another operator's signed lift notice (registry outage): the same
``Notices.apply`` as ``imeisync notice apply FILE``. Imported by ``console.routes``."""

from __future__ import annotations

from starlette.responses import Response

from imeisync.domain.errors import BadInput, ImeisyncError
from imeisync.domain.roles import Permission
from imeisync.entrypoints.console_base import MALFORMED, Page, _form_status


def notice_form(page: Page) -> Response:
    page.desk.require(page.caller, Permission.SUBMIT_ORDER)
    return page.render("notice.html", title="Apply a lift notice", done=None)


def notice_apply(page: Page) -> Response:
    page.desk.require(page.caller, Permission.SUBMIT_ORDER)
    errors: dict[str, str] = {}
    status = MALFORMED
    try:
        raw = page.files.get("notice_file")
        try:
            token = raw.decode("ascii").strip() if raw else page.form.get("notice_text", "")
        except UnicodeDecodeError:
            raise BadInput("the chosen file is not a lift notice (it is not plain text)",
                           "choose the .jws file the other operator sent") from None
        if not token.strip():
            errors["notice_file"] = ("Choose the lift notice file the other operator sent "
                                     "(.jws), or paste its text in the box below.")
        else:
            done = page.console.app.notices().apply(token, page.caller.name, page.caller.role)
            return page.render("notice.html", title="Lift notice applied", done=done)
    except ImeisyncError as exc:
        status = _form_status(exc)
        errors["notice_file"] = str(exc)
    return page.render("notice.html", status, title="Apply a lift notice", done=None,
                       errors=errors, values={"notice_text": page.form.get("notice_text", "")})
