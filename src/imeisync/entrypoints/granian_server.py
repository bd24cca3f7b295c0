"""One builder for every Granian server imeisync runs.

The attach check (``eir``), the police API alone (``api``), the daemon's API listener
(embedded in the supervisor's thread) and the reference registry all serve through Granian with
the same choices: HTTP/1.1 and h2c on one port (``--http auto``), TLS with ALPN when a PEM pair
is given, no websockets, no access log (a line per attach check would cost more than the check).
The attach check adds its fast path (``fast=True``): Granian's RSGI interface on uvloop with
Granian's Rust task implementation where the running Python supports it (``server_path``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, NamedTuple


class ServerPath(NamedTuple):
    """What serves a fast-path app: told in the start-up log and in ``/healthz``."""

    interface: str  # "rsgi"
    loop: str  # "uvloop", or "asyncio" when uvloop is not installed
    task_impl: str  # "rust" where Granian supports it (CPython < 3.12), else "asyncio"

    def describe(self) -> str:
        return f"Granian {self.interface.upper()} on {self.loop} with {self.task_impl} tasks"

    def as_dict(self) -> dict[str, str]:
        return self._asdict()


def server_path() -> ServerPath:
    """The fastest path this interpreter offers, falling back cleanly: Granian's Rust tasks are
    only available before Python 3.12 (it says so itself and falls back to asyncio); uvloop is a
    dependency, but a platform without its wheel still runs on asyncio."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    tasks = "rust" if sys.version_info < (3, 12) else "asyncio"
    return ServerPath("rsgi", loop, tasks)


def build(target: Any, host: str, port: int, *, workers: int = 1, factory: bool = True,
          tls: tuple[Path, Path] | None = None, fast: bool = False, embedded: bool = False,
          **overrides: Any) -> Any:
    """A Granian server for ``target`` (an import string, or the app itself when ``embedded``).

    ``fast``: the RSGI interface on ``server_path()``; otherwise ASGI. ``embedded``: Granian's
    embedded server, run by the caller in its own event loop (one process, no workers).
    ``overrides`` win over everything (benchmarks try alternatives).
    """
    from granian.constants import HTTPModes, Interfaces, Loops, TaskImpl

    options: dict[str, Any] = {"interface": Interfaces.ASGI, "http": HTTPModes.auto,
                               "websockets": False, "log_access": False}
    if fast:
        path = server_path()
        options.update(interface=Interfaces.RSGI, task_impl=TaskImpl(path.task_impl))
        if not embedded:
            options["loop"] = Loops(path.loop)
    if embedded:
        from granian.server.embed import Server as Embedded

        server_class: Any = Embedded
    else:
        from granian.server import Server

        server_class = Server
        options.update(workers=workers, factory=factory, backlog=2048)
    if tls is not None:
        options.update(ssl_cert=tls[0], ssl_key=tls[1])
    options.update(overrides)
    return server_class(target, address=host.strip("[]"), port=int(port), **options)
