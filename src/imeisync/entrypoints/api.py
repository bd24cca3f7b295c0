"""The ``[api] listen`` listener, assembled: the police liaison API (``entrypoints/police_api``),
the web console (``entrypoints/console``), ``/static``, and ``/healthz`` and ``/metrics`` unless
the caller serves its own (``ops=False``), with security headers on every response.

This module imports both halves and neither imports it. ``create_app(app)`` builds the Starlette
application; the daemon (``imeisync run``) mounts it, and ``python -m imeisync.entrypoints.api
--config PATH`` serves it alone with Granian.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
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

from imeisync.adapters.rate_limit import RateLimiter
from imeisync.bootstrap import App
from imeisync.config_values import parse_listen
from imeisync.domain.errors import ImeisyncError
from imeisync.entrypoints import console
from imeisync.entrypoints.http import MAX_BODY, Problem
from imeisync.entrypoints.http_auth import RATE_LIMITED, REQUESTS, Gate
from imeisync.entrypoints.police_api import PoliceAPI
from imeisync.store import sync_state

__all__ = ["MAX_BODY", "create_app", "main"]

log = logging.getLogger("imeisync.api")


# -- operations ------------------------------------------------------------------------------


def _health(app: App) -> dict[str, Any]:
    """The API listener's own health: database reachable, last sync steps."""
    body: dict[str, Any] = {"status": "ok", "service": "police-api"}
    try:
        with app.db.read() as session:
            state = sync_state.read(session)
        body["database"] = {"reachable": True}
        body["sync"] = state.outcomes()
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


class _Admission:
    """Before any routing, token check or database work: at most ``[api] address_rate``
    requests per client address (429), and no declared body over ``MAX_BODY`` on any route
    (413; the handlers that read a body stop a streamed one at the same limit)."""

    def __init__(self, app: ASGIApp, per_address: RateLimiter):
        self.app = app
        self.per_address = per_address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.per_address.take(client[0] if client else "unknown")
        problem = None
        if wait is not None:
            RATE_LIMITED.labels("api" if scope["path"].startswith("/api/") else "console",
                                "address").inc()
            problem = Problem(429, "too many requests from this address", "rate_limited",
                              f"slow down: wait {wait} seconds; the limit is [api] "
                              f"address_rate ({self.per_address.count} per "
                              f"{self.per_address.period:g} s)", {"Retry-After": str(wait)})
        else:
            declared = dict(scope["headers"]).get(b"content-length", b"0")
            if not declared.isdigit() or int(declared) > MAX_BODY:
                problem = Problem(413, f"the request is too large: its body is over the "
                                       f"{MAX_BODY // 1024} KiB limit", "too_large",
                                  "send a smaller body (a signed order is a small text file, "
                                  "at most 64 KiB)")
        if problem is None:
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(("/api/", "/healthz", "/metrics", "/static/")):
            response = problem.response()
        else:  # a person at the console: a page saying what to do
            response = await console.error_page(Request(scope), problem)
            response.headers.update(problem.headers)
        await response(scope, receive, send)


def create_app(app: App, *, ops: bool = True,
               health: Callable[[], dict[str, Any]] | None = None,
               limiter: RateLimiter | None = None,
               per_address: RateLimiter | None = None,
               per_token: RateLimiter | None = None) -> Starlette:
    """The police API, the web console and (unless ``ops=False``, for a daemon that serves
    its own) ``/healthz`` and ``/metrics``; ``health`` replaces the health body. The limiters
    default to ``[api]``'s rates (``limiter``: failed authentications)."""
    from imeisync.web import STATIC

    limits = app.config.api
    gate = Gate(lambda: app.tokens, limiter, per_token or RateLimiter.parse(limits.token_rate))
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
            return Problem(exc.status_code, str(exc.detail), code,
                           headers=dict(exc.headers or {})).response()
        return await console.http_error(request, exc)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        problem = Problem(500, "an unexpected error; it has been logged", "internal",
                          "try again; if it persists, tell the operations team")
        if request.url.path.startswith("/api/"):
            return problem.response()
        return await console.error_page(request, problem)

    starlette = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                            Exception: server_error})
    starlette.add_middleware(_Admission,
                             per_address=per_address or RateLimiter.parse(limits.address_rate))
    starlette.add_middleware(_Headers)  # outermost: refusals get the headers and are counted
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
        host, port = (parse_listen(args.listen, "--listen") if args.listen
                      else config.api.listen.address)
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

