"""The police liaison API (``/api/v1``; ``docs/api/police.yaml``): bearer tokens
(``imeisync token add``), the role from the token only (``domain.roles``), JSON in and out,
errors as RFC 9457 ``application/problem+json`` with ``type``, ``title``, ``status``,
``detail``, ``code`` and ``hint`` (``entrypoints/http.py`` maps imeisync's errors to statuses):

=====  =====================================================================================
400    malformed: JSON, JWS, IMEI, a field (``BadInput``)
401    no token, or one that is unknown or revoked (``WWW-Authenticate: Bearer``)
403    the token's role does not allow this (``NotAllowed``)
404    no such order, dispute or path (``NotFound``)
409    a replayed ``order_id`` (``Conflict``)
413    the body is over ``MAX_BODY`` bytes
415    a content type the endpoint does not take
422    refused by a rule: not the owner, no open record, bad police signature (``Refused``)
429    over a rate limit (``Retry-After``): failed authentications from this client or with
       this token, ``[api] address_rate``, ``token_rate`` or ``foreign_lookup_rate``
503    the database (or, for disputes, the registry) is unavailable (``Retry-After``)
=====  =====================================================================================

Served with the web console and operations endpoints by ``entrypoints/api.py``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from imeisync.bootstrap import App
from imeisync.domain.errors import ImeisyncError
from imeisync.domain.roles import Permission, allowed
from imeisync.entrypoints.http import Problem, client_address, media_type, read_body
from imeisync.entrypoints.http_auth import Gate
from imeisync.services.liaison import Caller, LiaisonDesk

_BODY_HINT = "a signed order is at most 64 KiB; keep notes and free text short"


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Problem(400, "the body is not UTF-8 text", "malformed_json") from None
    except json.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}", "malformed_json",
                      "send one JSON object") from None
    if not isinstance(data, dict):
        raise Problem(400, "the body must be a JSON object", "malformed_json")
    return data


def _int_param(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise Problem(400, f"query parameter {name} must be a whole number", "malformed")
    return int(value)


Handler = Callable[[Request, Caller], Awaitable[Response]]


class PoliceAPI:
    """The ``/api/v1`` endpoints: authenticate, call the desk in a thread, render."""

    def __init__(self, app: App, gate: Gate):
        self.app = app
        self.gate = gate

    def desk(self) -> LiaisonDesk:
        return self.app.desk()

    def routes(self) -> list[BaseRoute]:
        e = self._endpoint
        return [
            Route("/api/v1/orders", e(self.post_order, Permission.SUBMIT_ORDER), methods=["POST"]),
            Route("/api/v1/orders", e(self.list_orders, Permission.READ_CASES), methods=["GET"]),
            Route("/api/v1/orders/{order_id:path}", e(self.get_order, Permission.READ_CASES),
                  methods=["GET"]),
            Route("/api/v1/devices/{imei}", e(self.get_device, Permission.READ_CASES),
                  methods=["GET"]),
            Route("/api/v1/disputes", e(self.post_dispute, Permission.FILE_DISPUTE),
                  methods=["POST"]),
            Route("/api/v1/disputes", e(self.list_disputes, Permission.READ_CASES),
                  methods=["GET"]),
            Route("/api/v1/disputes/{dispute_id}/answer",
                  e(self.answer_dispute, Permission.ANSWER_DISPUTE), methods=["POST"]),
            Route("/api/v1/disputes/{dispute_id}", e(self.get_dispute, Permission.READ_CASES),
                  methods=["GET"]),
            Route("/api/v1/sightings", e(self.list_sightings, Permission.READ_CASES),
                  methods=["GET"]),
            Route("/api/v1/sightings/disclosures",
                  e(self.list_disclosures, Permission.READ_AUDIT), methods=["GET"]),
            Route("/api/v1/sightings/{sighting_id}", e(self.get_sighting, Permission.READ_CASES),
                  methods=["GET"]),
            # the role is checked (and a refusal audited) by the disclosure itself
            Route("/api/v1/sightings/{sighting_id}/disclosure", e(self.post_disclosure, None),
                  methods=["POST"]),
            Route("/api/v1/audit", e(self.get_audit, Permission.READ_AUDIT), methods=["GET"]),
            Route("/api/v1/tokens", e(self.get_tokens, Permission.MANAGE_TOKENS),
                  methods=["GET"]),
        ]

    def _endpoint(self, handler: Handler, permission: Permission | None
                  ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                caller = self._authenticate(request)
                if permission is not None:  # before the body is read
                    LiaisonDesk.require(caller, permission)
                return await handler(request, caller)
            except Problem as problem:
                return problem.response()
            except ImeisyncError as error:
                return Problem.of(error).response()

        return endpoint

    def _authenticate(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        presented = presented.strip() if scheme.lower() == "bearer" else ""
        info = self.gate.check(presented or None, client_address(request), "api")
        if info is None:
            if not header:
                raise Problem(401, "this endpoint needs a token", "no_token",
                              "send Authorization: Bearer <token> (imeisync token add)",
                              {"WWW-Authenticate": 'Bearer realm="imeisync"'})
            raise Problem(401, "the token is not valid (unknown, revoked or malformed)",
                          "bad_token", "ask an administrator for a new token",
                          {"WWW-Authenticate": 'Bearer realm="imeisync", error="invalid_token"'})
        self.gate.admit(info.name, "api")
        return Caller(info.name, info.role, "api")

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse(data, status_code=status, headers=headers)

    # -- orders --------------------------------------------------------------------------

    async def post_order(self, request: Request, caller: Caller) -> Response:
        kind = media_type(request)
        if kind not in ("application/jose", "application/json"):
            raise Problem(415, f"POST /api/v1/orders takes application/jose (a signed order) "
                               f"or application/json (an unsigned block), not {kind or 'nothing'}",
                          "unsupported_media_type",
                          "send the police's compact JWS as application/jose")
        body = await read_body(request, hint=_BODY_HINT)
        desk = self.desk()
        if kind == "application/jose":
            try:
                token = body.decode("ascii").strip()
            except UnicodeDecodeError:
                raise Problem(400, "the signed order is not ASCII text (a compact JWS is)",
                              "malformed_jws") from None
            confirmed = request.query_params.get("unknown_tac_ok", "false").lower()
            if confirmed not in ("true", "false"):
                raise Problem(400, "query unknown_tac_ok must be true or false",
                              "malformed_order")
            outcome = await run_in_threadpool(desk.submit_signed, caller, token,
                                              confirmed == "true")
        else:
            payload = _json_object(body)
            outcome = await run_in_threadpool(desk.submit_block, caller, payload)
        data = {**outcome.as_dict(), "progress": f"/api/v1/orders/{outcome.order_id}"}
        status = 201 if outcome.outcome == "accepted" else 200
        return self._json(data, status, {"Location": data["progress"]})

    async def list_orders(self, request: Request, caller: Caller) -> Response:
        mine = request.query_params.get("mine", "true").lower() not in ("false", "0", "no")
        limit = _int_param(request, "limit", 50)
        rows = await run_in_threadpool(self.desk().orders, caller, mine=mine, limit=limit)
        return self._json({"orders": rows})

    async def get_order(self, request: Request, caller: Caller) -> Response:
        order_id = request.path_params["order_id"]
        return self._json(await run_in_threadpool(self.desk().order, caller, order_id))

    # -- devices -------------------------------------------------------------------------

    async def get_device(self, request: Request, caller: Caller) -> Response:
        imei = request.path_params["imei"]
        return self._json(await run_in_threadpool(self.desk().device, caller, imei))

    # -- disputes ------------------------------------------------------------------------

    async def post_dispute(self, request: Request, caller: Caller) -> Response:
        if media_type(request) != "application/json":
            raise Problem(415, "POST /api/v1/disputes takes application/json",
                          "unsupported_media_type",
                          'send {"imei", "case_ref", "reason"} (and "owner" if several '
                          "operators block the device)")
        data = _json_object(await read_body(request, hint=_BODY_HINT))
        unknown = sorted(set(data) - {"imei", "case_ref", "reason", "owner"})
        if unknown:
            raise Problem(400, f"unknown field(s): {', '.join(u[:30] for u in unknown[:5])}",
                          "malformed", 'a dispute has "imei", "case_ref", "reason", "owner"')
        fields = {}
        for name in ("imei", "case_ref", "reason", "owner"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise Problem(400, f"field {name} must be text", "malformed")
            fields[name] = value
        if not fields["imei"]:
            raise Problem(400, "field imei is required", "malformed")
        result = await run_in_threadpool(
            self.desk().file_dispute, caller, fields["imei"], fields["case_ref"] or "",
            fields["reason"] or "", fields["owner"])
        location = f"/api/v1/disputes/{result['dispute_id']}"
        return self._json(result, 201, {"Location": location})

    async def list_disputes(self, request: Request, caller: Caller) -> Response:
        rows = await run_in_threadpool(
            self.desk().disputes, caller, direction=request.query_params.get("direction"),
            state=request.query_params.get("state"))
        return self._json({"disputes": rows})

    async def get_dispute(self, request: Request, caller: Caller) -> Response:
        dispute_id = request.path_params["dispute_id"]
        return self._json(await run_in_threadpool(self.desk().dispute, caller, dispute_id))

    async def answer_dispute(self, request: Request, caller: Caller) -> Response:
        if media_type(request) != "application/json":
            raise Problem(415, "answers take application/json", "unsupported_media_type",
                          '{"answer": "upheld", "reason": TEXT} or '
                          '{"answer": "lifted", "order": "<the police\'s signed lift order>"}')
        data = _json_object(await read_body(request, hint=_BODY_HINT))
        dispute_id = request.path_params["dispute_id"]
        desk = self.desk()
        answer = data.get("answer")
        if answer == "upheld":
            reason = data.get("reason")
            if not isinstance(reason, str):
                raise Problem(400, "an upheld answer needs a reason (text)", "malformed")
            return self._json(await run_in_threadpool(desk.uphold, caller, dispute_id, reason))
        if answer == "lifted":
            order = data.get("order")
            if not isinstance(order, str):
                raise Problem(400, "a lifted answer needs the police's signed lift order in "
                                   "\"order\"", "malformed",
                              "only a police-signed lift removes our record")
            outcome = await run_in_threadpool(desk.lift_for_dispute, caller, dispute_id,
                                              order.strip())
            return self._json({**outcome.as_dict(),
                               "progress": f"/api/v1/orders/{outcome.order_id}"}, 201)
        raise Problem(400, 'answer must be "upheld" or "lifted"', "malformed")

    # -- sightings -----------------------------------------------------------------------

    async def list_sightings(self, request: Request, caller: Caller) -> Response:
        query = request.query_params
        return self._json(await run_in_threadpool(
            self.app.sighting_cases().listing, caller, case_ref=query.get("case_ref"),
            imei=query.get("imei"), limit=_int_param(request, "limit", 100)))

    async def get_sighting(self, request: Request, caller: Caller) -> Response:
        return self._json(await run_in_threadpool(
            self.app.sighting_cases().get, caller, request.path_params["sighting_id"]))

    async def post_disclosure(self, request: Request, caller: Caller) -> Response:
        cases = self.app.sighting_cases()
        sighting_id = request.path_params["sighting_id"]
        if not allowed(caller.role, Permission.DISCLOSE_SUBSCRIBER):  # refused, audited, unread
            await run_in_threadpool(cases.disclose, caller, sighting_id, None, None)
        if media_type(request) != "application/json":
            raise Problem(415, "a disclosure takes application/json", "unsupported_media_type",
                          '{"court_order": REF, "court": NAME}')
        data = _json_object(await read_body(request, hint=_BODY_HINT))
        unknown = sorted(set(data) - {"court_order", "court"})
        if unknown:
            raise Problem(400, f"unknown field(s): {', '.join(u[:30] for u in unknown[:5])}",
                          "malformed", 'a disclosure has "court_order" and "court"')
        result = await run_in_threadpool(cases.disclose, caller, sighting_id,
                                         data.get("court_order"), data.get("court"))
        return self._json(result, 201, {"Cache-Control": "no-store"})

    async def list_disclosures(self, request: Request, caller: Caller) -> Response:
        after = _int_param(request, "after", 0)
        rows = await run_in_threadpool(self.app.sighting_cases().disclosures, caller,
                                       after=after, limit=_int_param(request, "limit", 100))
        return self._json({"disclosures": rows, "next_after": rows[-1]["id"] if rows else after})

    # -- audit and tokens ----------------------------------------------------------------

    async def get_audit(self, request: Request, caller: Caller) -> Response:
        events = await run_in_threadpool(
            self.desk().audit_events, caller, after=_int_param(request, "after", 0),
            limit=_int_param(request, "limit", 100))
        return self._json({"events": events,
                           "next_after": events[-1]["id"] if events else
                           _int_param(request, "after", 0)})

    async def get_tokens(self, request: Request, caller: Caller) -> Response:
        return self._json({"tokens": [t.public() for t in self.gate.tokens.list()]})
