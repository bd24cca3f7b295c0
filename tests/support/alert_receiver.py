"""The police unit's alert endpoint, for tests: a real HTTP server on 127.0.0.1 that verifies
each JWS with the operator's public key as a sighting alert, records what arrives, and answers
as told (``ok``, ``500``, ``hang`` or ``redirect``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from imeisync.adapters.signed_documents import verify_document
from imeisync.services.sighting_alerts import ALERT_TYP


@dataclass
class Receiver:
    """The police unit's endpoint: records what arrives; ``behaviour`` says how to answer."""

    public_key: Any
    behaviour: str = "ok"  # ok | 500 | hang | redirect
    hang: float = 3.0
    received: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                token = body.decode("ascii")
                receiver.received.append({
                    "path": self.path, "token": token,
                    "idempotency_key": self.headers.get("idempotency-key"),
                    "content_type": self.headers.get("content-type"),
                    # raises unless signed by the operator's key as a sighting alert
                    "payload": verify_document(token, receiver.public_key, ALERT_TYP,
                                               "sighting alert")})
                if receiver.behaviour == "hang":
                    time.sleep(receiver.hang)
                    return
                if receiver.behaviour == "redirect":
                    self.send_response(307)
                    self.send_header("Location", "/elsewhere")
                elif receiver.behaviour == "500":
                    self.send_response(500)
                else:
                    self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
