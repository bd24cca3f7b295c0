"""The web console's sightings pages: the list of our tracked devices seen (and seen on other
operators' networks), one sighting with its disclosures, and the disclosure form that shows the
subscriber (IMSI) once, on a court order (``services/sighting_cases.py``)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from imeisync.domain.errors import ImeisyncError
from imeisync.domain.roles import Permission
from imeisync.entrypoints.console_base import Page, _form_status, field_of

DISCLOSURE_FIELDS = ("court_order", "court")


def sightings(page: Page) -> Response:
    found = page.console.app.sighting_cases().listing(page.caller, limit=200)
    return page.render("sightings.html", title="Sightings", **found)


def sighting(page: Page, status: int = 200, **context: Any) -> Response:
    view = page.console.app.sighting_cases().get(page.caller,
                                                 page.request.path_params["sighting_id"])
    context.setdefault("disclosed", None)
    return page.render("sighting.html", status, title=context.pop("title", "Sighting"), s=view,
                       can_disclose=page.can(Permission.DISCLOSE_SUBSCRIBER)
                       and context["disclosed"] is None, **context)


def disclose(page: Page) -> Response:
    """Record the court order, then show the IMSI in this answer only (never stored, never in
    a URL, not cached): a reload is a new disclosure, recorded and audited again."""
    values = {name: page.form.get(name, "").strip() for name in DISCLOSURE_FIELDS}
    try:
        done = page.console.app.sighting_cases().disclose(
            page.caller, page.request.path_params["sighting_id"], values["court_order"],
            values["court"])
    except ImeisyncError as exc:
        return sighting(page, _form_status(exc), values=values,
                        errors={field_of(exc, DISCLOSURE_FIELDS): str(exc)})
    response = sighting(page, disclosed=done, title="Subscriber disclosed")
    response.headers["Cache-Control"] = "no-store"
    return response
