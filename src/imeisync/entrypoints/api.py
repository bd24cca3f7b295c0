"""The police liaison HTTP API and the web console, on the ``[api] listen`` listener.

``create_app(app)`` builds the Starlette application; the daemon (``imeisync run``) mounts it,
and ``python -m imeisync.entrypoints.api --config PATH`` serves it alone with Granian.

API (``docs/api/police.yaml``): bearer tokens (``imeisync token add``), the role from the token
only (``domain.roles``), JSON in and out, errors as RFC 9457 ``application/problem+json`` with
``type``, ``title``, ``status``, ``detail``, ``code`` and ``hint``:

=====  =====================================================================================
400    malformed: JSON, JWS, IMEI, a field (``BadInput``)
401    no token, or one that is unknown or revoked (``WWW-Authenticate: Bearer``)
403    the token's role does not allow this
404    no such order, dispute or path
409    a replayed ``order_id``
413    the body is over ``MAX_BODY`` bytes
415    a content type the endpoint does not take
422    refused by a rule: not the owner, no open record, bad police signature (``Refused``)
429    too many failed authentications from this client or with this token (``Retry-After``)
503    the database (or, for disputes, the registry) is unavailable (``Retry-After``)
=====  =====================================================================================

The web console is at ``/`` (``entrypoints.console``); ``/healthz`` and ``/metrics`` unless the
caller serves its own (``ops=False``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imeisync.bootstrap import App
from imeisync.config import parse_listen
from imeisync.domain.errors import BadInput, ImeisyncError, Unavailable
from imeisync.domain.roles import Permission
from imeisync.entrypoints.http_auth import REQUESTS, FailureLimiter, Gate, Throttled
from imeisync.services.liaison import Caller, LiaisonDesk, NotAllowed

log = logging.getLogger("imeisync.api")

MAX_BODY = 128 * 1024  # a signed order is at most 64 KiB; blocks and disputes are small
PROBLEM = "application/problem+json"
PROBLEM_BASE = "https://imeisync.invalid/problems/"


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Content",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
_NOT_FOUND_CODES = {"no_order", "no_dispute"}


class Problem(Exception):
    """An HTTP error the handlers raise; rendered as problem+json (API) or a page (console)."""

    def __init__(self, status: int, detail: str, code: str, hint: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.code, self.hint = status, detail, code, hint
        self.headers = headers or {}

    @classmethod
    def of(cls, error: ImeisyncError) -> Problem:
        """``BadInput`` 400, ``NotAllowed`` 403, replay 409, ``Refused`` 422 (or 404 when the
        thing asked for does not exist), ``Unavailable`` 503."""
        code = error.code
        if isinstance(error, NotAllowed):
            return cls(403, error.message, code or "forbidden", error.hint)
        if isinstance(error, Unavailable):
            return cls(503, error.message, code or "unavailable", error.hint,
                       {"Retry-After": "30"})
        if isinstance(error, BadInput):
            return cls(400, error.message, code or "malformed", error.hint)
        if code == "replayed_order_id":
            return cls(409, error.message, code, error.hint)
        if code in _NOT_FOUND_CODES:
            return cls(404, error.message, code, error.hint)
        return cls(422, error.message, code or "refused", error.hint)


def problem_response(problem: Problem) -> Response:
    body: dict[str, Any] = {"type": PROBLEM_BASE + problem.code.replace("_", "-"),
                            "title": _TITLES.get(problem.status, "Error"),
                            "status": problem.status, "detail": problem.detail,
                            "code": problem.code}
    if problem.hint:
        body["hint"] = problem.hint
    return Response(json.dumps(body, ensure_ascii=False), status_code=problem.status,
                    media_type=PROBLEM, headers=problem.headers)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = Problem(413, f"the request body is over the {limit}-byte limit", "too_large",
                        "a signed order is at most 64 KiB; keep notes and free text short")
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
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


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
            Route("/api/v1/audit", e(self.get_audit, Permission.READ_AUDIT), methods=["GET"]),
            Route("/api/v1/tokens", e(self.get_tokens, Permission.MANAGE_TOKENS),
                  methods=["GET"]),
        ]

    def _endpoint(self, handler: Handler, permission: Permission
                  ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                caller = self._authenticate(request)
                LiaisonDesk.require(caller, permission)  # before the body is read
                return await handler(request, caller)
            except Problem as problem:
                return problem_response(problem)
            except ImeisyncError as error:
                return problem_response(Problem.of(error))

        return endpoint

    def _authenticate(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        presented = presented.strip() if scheme.lower() == "bearer" else ""
        try:
            info = self.gate.check(presented or None, client_address(request), "api")
        except Throttled as exc:
            raise Problem(429, "too many failed authentications from this client or with "
                               "this token", "too_many_failures",
                          f"wait {exc.retry_after} seconds, then use a valid token",
                          {"Retry-After": str(exc.retry_after)}) from None
        if info is None:
            if not header:
                raise Problem(401, "this endpoint needs a token", "no_token",
                              "send Authorization: Bearer <token> (imeisync token add)",
                              {"WWW-Authenticate": 'Bearer realm="imeisync"'})
            raise Problem(401, "the token is not valid (unknown, revoked or malformed)",
                          "bad_token", "ask an administrator for a new token",
                          {"WWW-Authenticate": 'Bearer realm="imeisync", error="invalid_token"'})
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
        body = await read_body(request)
        desk = self.desk()
        if kind == "application/jose":
            try:
                token = body.decode("ascii").strip()
            except UnicodeDecodeError:
                raise Problem(400, "the signed order is not ASCII text (a compact JWS is)",
                              "malformed_jws") from None
            outcome = await run_in_threadpool(desk.submit_signed, caller, token)
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
        data = _json_object(await read_body(request))
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
        data = _json_object(await read_body(request))
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


# -- operations ------------------------------------------------------------------------------


def _health(app: App) -> dict[str, Any]:
    """The API listener's own health: database reachable, last sync steps."""
    from sqlalchemy import select

    from imeisync.store.models import SyncState

    body: dict[str, Any] = {"status": "ok", "service": "police-api"}
    try:
        with app.db.read() as session:
            state = {r.name: r.value for r in session.execute(select(SyncState)).scalars()}
        body["database"] = {"reachable": True}
        body["sync"] = {k: v for k, v in state.items() if k.endswith(("last_success",
                                                                      "last_error"))}
    except ImeisyncError as exc:
        body["status"] = "degraded"
        body["database"] = {"reachable": False, "error": exc.message}
    return body


def ops_routes(app: App, health: Callable[[], dict[str, Any]] | None) -> list[BaseRoute]:
    async def healthz(request: Request) -> Response:
        body = await run_in_threadpool(health or (lambda: _health(app)))
        return JSONResponse(body, status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]


# -- composition -----------------------------------------------------------------------------


class _Headers:
    """Security headers on every response, and request counts by area."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        area = ("api" if path.startswith("/api/") else
                "ops" if path in ("/healthz", "/metrics") else
                "static" if path.startswith("/static/") else "console")

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY")]
                if area in ("api", "console") and b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if area == "console":
                    extra.append((b"content-security-policy",
                                  b"default-src 'none'; style-src 'self'; img-src 'self'; "
                                  b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"))
                headers.extend(h for h in extra if h[0] not in names)
                REQUESTS.labels(area, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, wrapped)


def create_app(app: App, *, ops: bool = True,
               health: Callable[[], dict[str, Any]] | None = None,
               limiter: FailureLimiter | None = None) -> Starlette:
    """The police API, the web console and (unless ``ops=False``, for a daemon that serves
    its own) ``/healthz`` and ``/metrics``; ``health`` replaces the health body."""
    from imeisync.entrypoints import console
    from imeisync.web import STATIC

    gate = Gate(lambda: app.tokens, limiter)
    api = PoliceAPI(app, gate)
    routes: list[BaseRoute] = [*api.routes()]
    if ops:
        routes += ops_routes(app, health)
    routes += [Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
               *console.routes(app, gate)]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/api/"):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
            return problem_response(Problem(exc.status_code, str(exc.detail), code,
                                            headers=dict(exc.headers or {})))
        return await console.http_error(request, exc)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        problem = Problem(500, "an unexpected error; it has been logged", "internal",
                          "try again; if it persists, tell the operations team")
        if request.url.path.startswith("/api/"):
            return problem_response(problem)
        return await console.error_page(request, problem)

    starlette = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                            Exception: server_error})
    starlette.add_middleware(_Headers)
    starlette.state.app = app
    starlette.state.gate = gate
    return starlette


def app_from_environment() -> Starlette:
    """Granian's factory: the config named by ``IMEISYNC_CONFIG``."""
    from imeisync.config import load_config

    return create_app(App(load_config()))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys
    from pathlib import Path

    from imeisync.config import load_config
    from imeisync.entrypoints.granian_server import build

    parser = argparse.ArgumentParser(
        prog="python -m imeisync.entrypoints.api",
        description="Serve the police liaison API and web console alone (the daemon "
                    "`imeisync run` serves them with everything else).")
    parser.add_argument("--config", metavar="PATH", default=None)
    parser.add_argument("--listen", default=None, help="HOST:PORT (default: [api] listen)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        App(config).db  # noqa: B018 — create the schema once, with a clear message
    except ImeisyncError as error:
        print(f"imeisync: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    if config.source and Path(config.source).is_file():
        os.environ["IMEISYNC_CONFIG"] = str(Path(config.source).resolve())
    try:
        host, port = parse_listen(args.listen or config.get("api", "listen"), "--listen")
    except ImeisyncError as error:
        print(f"imeisync: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    tls = (Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None
    build("imeisync.entrypoints.api:app_from_environment", host, int(port),
          workers=args.workers, tls=tls).serve()


if __name__ == "__main__":
    # Run the module's main, not this __main__ copy (whose metrics would be registered twice).
    from imeisync.entrypoints.api import main as _main

    _main()

