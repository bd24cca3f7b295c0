"""The API listener: Granian's embedded server in a thread of the supervisor, serving
``/healthz`` and ``/metrics`` itself and everything else through the police API and console."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imeisync.entrypoints import logs
from imeisync.entrypoints.asgi import ASGIApp, Receive, Scope, Send
from imeisync.entrypoints.daemon.children import LISTENER_DRAIN
from imeisync.entrypoints.daemon.ports import split_listen

log = logging.getLogger("imeisync.daemon")


_JSON = b"application/json"
_PROBLEM = b"application/problem+json"


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


class OpsFront:
    """The API listener's ASGI app: ``/healthz`` and ``/metrics`` here, everything else to the
    police API and console (``imeisync.entrypoints.api:create_app``) when it is installed."""

    def __init__(self, inner: ASGIApp | None, health: Callable[[], tuple[int, dict[str, Any]]],
                 metrics: Callable[[], bytes]):
        self.inner = inner
        self.health = health
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            if self.inner is not None:
                await self.inner(scope, receive, send)
                return
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope.get("path", "")
        if kind == "http" and path in ("/healthz", "/metrics"):
            if scope["method"] not in ("GET", "HEAD"):
                body = json.dumps({"title": "Method Not Allowed", "status": 405,
                                   "detail": f"{path} only supports GET"}).encode()
                await _respond(send, 405, body, _PROBLEM)
                return
            if path == "/healthz":
                status, data = await asyncio.to_thread(self.health)
                await _respond(send, status, json.dumps(data, indent=1, default=str).encode(),
                               _JSON)
            else:
                text = await asyncio.to_thread(self.metrics)
                await _respond(send, 200, text, b"text/plain; version=0.0.4; charset=utf-8")
            return
        if self.inner is not None:
            await self.inner(scope, receive, send)
            return
        if kind == "http":
            body = json.dumps({"title": "Not Found", "status": 404, "detail":
                               "the police API is not installed in this build; only /healthz "
                               "and /metrics are served here"}).encode()
            await _respond(send, 404, body, _PROBLEM)


class ApiListener:
    """Granian's embedded server in a thread with its own event loop."""

    def __init__(self, asgi: ASGIApp, listen: str, tls: tuple[Path, Path] | None,
                 log_settings: tuple[str, str] = ("kv", "INFO")):
        self.asgi = asgi
        self.log_settings = log_settings
        self.listen = listen
        self.tls = tls
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api-listener", daemon=True)

    def start(self) -> ApiListener:
        from imeisync.entrypoints.granian_server import build

        host, port = split_listen(self.listen)
        fmt, level = self.log_settings
        self.server = build(self.asgi, host, port, tls=self.tls, embedded=True,
                            log_dictconfig=logs.granian_log_config(fmt, level))
        self.server.workers_kill_timeout = LISTENER_DRAIN  # (not a constructor argument)
        self._thread.start()
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        except BaseException as exc:
            self.error = exc
            log.error("police API listener on %s stopped: %s", self.listen, exc)
        finally:
            with contextlib.suppress(Exception):
                self.loop.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.server.stop)

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

