"""Listen addresses of the daemon's listeners: parsing, "is the port free?", "does it answer?"."""

from __future__ import annotations

import errno
import http.client
import socket
import ssl

from imeisync.config_sections import Listen
from imeisync.domain.errors import Unavailable


def split_listen(listen: str) -> tuple[str, int]:
    return Listen.of(listen).address


def probe_host(host: str) -> str:
    """Where to reach a listener bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check_free(section: str, listen: str) -> None:
    """Refuse to start on a port that is taken, with a message naming the key."""
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            hint = ("another process listens there (another imeisync?): stop it or change "
                    f"[{section}] listen") if exc.errno == errno.EADDRINUSE else \
                f"check [{section}] listen (an address of this machine)"
            raise Unavailable(f"[{section}] listen {listen}: {exc.strerror}", hint,
                              code="listen_failed") from None


def probe(listen: str, path: str = "/healthz", *, tls: bool = False,
          timeout: float = 2.0) -> tuple[int, bytes] | None:
    """GET ``path`` on a listener; (status, body), or None when it does not answer."""
    host, port = split_listen(listen)
    host = probe_host(host)
    try:
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # our own listener, only asked whether it is up
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None

