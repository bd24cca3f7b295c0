"""``imeisync run``: the daemon — attach check, police API, scheduled sync, under systemd.

Process layout (``ps --forest``)::

    imeisync run                      supervisor: signals, sd_notify, leader election, the
    │                                 scheduler, the police API listener ([api] listen, Granian
    │                                 embedded in a thread), metrics and health
    ├─ python -m …daemon eir          Granian master of the attach check ([eir] listen)
    │  ├─ worker 1 … N                each with its own in-memory index ([eir] workers)
    └─ python -m …s13                 the Diameter S13 listener ([s13] listen, when set): one
                                      asyncio process with its own index (entrypoints/s13.py)

Why the attach check runs in a supervised child rather than in the supervisor: Granian's
multi-process server must own the main thread and its signals, and forks its workers — forking a
process that runs a scheduler, database pools and an event loop in threads is asking for a
deadlock. The child is a clean single-threaded process made by ``eir.server()`` (the same
composition as ``python -m imeisync.entrypoints.eir``), with a daemon-specific worker factory
that adds the run-time board (``telemetry.py``). The supervisor starts it in its own session,
forwards SIGTERM to it, restarts it with back-off if it dies (Granian itself respawns a crashed
worker), and the child dies with the supervisor (``PR_SET_PDEATHSIG``). The police API carries
little traffic, so it runs in the supervisor (Granian's embedded server), where SIGHUP can
reload police keys and tokens in place, without restarting anything or dropping a request.

Signals:

* SIGTERM / SIGINT — stop accepting on both listeners, let in-flight requests finish (Granian's
  graceful shutdown, at most 20 s), wait up to 10 s for running jobs, make one last push
  attempt (leader only; no retries, short timeouts), release the leadership, exit 0.
* SIGHUP — re-read the trusted police keys and the API tokens (``App.reload()``); on error the
  old sets stay in force and the error is logged.

Readiness: ``READY=1`` once every attach-check worker has its index loaded, both listeners
answer ``/healthz`` and, with ``[s13] listen`` set, the S13 listener answers. ``WATCHDOG=1``
every half ``WatchdogSec`` while the supervisor's loop runs, the attach-check server and the API
listener answer (any HTTP status: a database outage is not a reason to be killed), the S13
listener runs, the election thread is alive and no job is hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, generate_latest
from sqlalchemy.engine import make_url

from imeisync.adapters.leader import Leadership, leadership_for, node_name
from imeisync.adapters.systemd import Notifier, watchdog_interval
from imeisync.bootstrap import App
from imeisync.config import Config, load_config
from imeisync.domain.errors import BadInput, ImeisyncError, Unavailable
from imeisync.entrypoints import logs
from imeisync.entrypoints.logs import event
from imeisync.entrypoints.telemetry import (
    RUN_DIR_ENV,
    WORKER_STALE_AFTER,
    Board,
    eir_families,
    ops_families,
    render,
)
from imeisync.services.operations import OpsFigures, OpsReader
from imeisync.store.db import describe_url

log = logging.getLogger("imeisync.daemon")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LISTENER_DRAIN = 20  # seconds for in-flight requests at shutdown
JOB_DRAIN = 10.0  # seconds to let running jobs finish at shutdown
FINAL_PUSH = 10.0  # seconds the last push may wait for a running one
EIR_CRASHES = 5  # attach-check server deaths within EIR_CRASH_WINDOW before giving up
EIR_CRASH_WINDOW = 300.0
SUPERVISOR_ENV = "IMEISYNC_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


# -- addresses -----------------------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


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


# -- the attach-check child ----------------------------------------------------------------------


def eir_worker_app() -> ASGIApp:
    """Granian's factory in each attach-check worker the daemon runs (``eir.app_from_config``
    plus the board: figures out, daemon figures in)."""
    from imeisync.adapters.attach_index import IndexKeeper
    from imeisync.entrypoints.eir import KeeperLookup, Metrics, create_app
    from imeisync.entrypoints.telemetry import SnapshotWriter, worker_metrics_renderer

    config = load_config()
    board = Board.from_environment()
    keeper = IndexKeeper(config.database_url, config.get("eir", "index_file") or None).start()
    lookup = KeeperLookup(keeper)
    metrics = Metrics(lookup)
    if board is None:  # served outside the daemon: the plain attach-check app
        return create_app(lookup, unknown_status=config.get("eir", "unknown_status"),
                          metrics=metrics)
    SnapshotWriter(board, metrics, lookup.health).start()

    def daemon_health() -> dict[str, Any]:
        daemon = board.daemon() or {}
        workers = board.workers()
        return {
            "workers": {"ready": sum(1 for w in workers if (w.get("health") or {}).get(
                "ready") and w["age"] < WORKER_STALE_AFTER), "running": len(workers)},
            "sync": daemon.get("sync"),
            "leader": daemon.get("leader"),
        }

    return create_app(lookup, unknown_status=config.get("eir", "unknown_status"),
                      extra_health=daemon_health, metrics=metrics,
                      render_metrics=worker_metrics_renderer(board, metrics))


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    expected = os.environ.get(SUPERVISOR_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        sys.exit(0)  # the supervisor died before the request took effect


def eir_child_main(config_path: str | None) -> None:
    """``python -m imeisync.entrypoints.daemon eir [--config PATH]``: the attach-check server
    as the daemon runs it. Not meant to be started by hand (use ``imeisync run``)."""
    from imeisync.entrypoints import eir

    _die_with_parent()
    config = load_config(config_path)
    fmt, level = config.get("log", "format"), config.get("log", "level")
    logs.configure(fmt, level)
    eir._prepare_store(config)
    # No workers_kill_timeout: Granian 2.8 reports (and SIGKILLs) a worker that already stopped
    # when its watcher thread reaped it first; the supervisor bounds the drain instead.
    srv = eir.server(config, target="imeisync.entrypoints.daemon:eir_worker_app",
                     respawn_failed_workers=True,
                     log_dictconfig=logs.granian_log_config(fmt, level))
    srv.serve()


class EirChild:
    """The attach-check server process: started, watched, restarted, stopped."""

    def __init__(self, config: Config, board: Board):
        self.config = config
        self.board = board
        self.proc: subprocess.Popen[bytes] | None = None
        self.deaths: deque[float] = deque()
        self.restart_at: float | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID")}
        env[RUN_DIR_ENV] = str(self.board.folder)
        env[SUPERVISOR_ENV] = str(os.getpid())
        command = [sys.executable, "-m", "imeisync.entrypoints.daemon", "eir"]
        if self.config.source and Path(self.config.source).is_file():
            command += ["--config", str(Path(self.config.source).resolve())]
        self.proc = subprocess.Popen(command, env=env, start_new_session=True)
        self.restart_at = None
        log.info("attach-check server started (pid %d) on %s with %s worker(s)", self.proc.pid,
                 self.config.get("eir", "listen"),
                 self.config.get("eir", "workers") or os.cpu_count())

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> int | None:
        """The exit status if it died (its whole process group is then killed), else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind by a dead master
        self.proc = None
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > EIR_CRASH_WINDOW:
            self.deaths.popleft()
        return code

    def crash_looping(self) -> bool:
        return len(self.deaths) >= EIR_CRASHES

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("attach-check server did not stop within %ss; killing it", timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # nothing should be left; make sure
        return True


class S13Child(EirChild):
    """The S13 (Diameter) listener process, ``python -m imeisync.entrypoints.s13``: started,
    watched, restarted and stopped like the attach-check server. On SIGTERM it sends DPR to
    every peer and waits for their DPAs (bounded) before it exits; it dies with the supervisor
    (parent-death signal, and a check of the supervisor's pid every second)."""

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID")}
        env[RUN_DIR_ENV] = str(self.board.folder)
        env[SUPERVISOR_ENV] = str(os.getpid())
        command = [sys.executable, "-m", "imeisync.entrypoints.s13"]
        if self.config.source and Path(self.config.source).is_file():
            command += ["--config", str(Path(self.config.source).resolve())]
        self.proc = subprocess.Popen(command, env=env, start_new_session=True)
        self.restart_at = None
        log.info("S13 (Diameter) listener started (pid %d) on %s (%s)", self.proc.pid,
                 self.config.get("s13", "listen"), self.config.get("s13", "transport"))


# -- the API listener ----------------------------------------------------------------------------


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

    def __init__(self, asgi: ASGIApp, listen: str, tls: tuple[str, str] | None,
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
        from granian.constants import HTTPModes, Interfaces
        from granian.server.embed import Server

        host, port = split_listen(self.listen)
        fmt, level = self.log_settings
        options: dict[str, Any] = {"interface": Interfaces.ASGI, "http": HTTPModes.auto,
                                   "websockets": False, "log_access": False,
                                   "log_dictconfig": logs.granian_log_config(fmt, level)}
        if self.tls:
            options.update(ssl_cert=Path(self.tls[0]), ssl_key=Path(self.tls[1]))
        self.server = Server(self.asgi, address=host, port=port, **options)
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


# -- the supervisor ------------------------------------------------------------------------------


class Daemon:
    def __init__(self, config: Config, *, notifier: Notifier | None = None):
        self.config = config
        self.app = App(config)
        self.notifier = notifier or Notifier()
        self.expected_workers = int(config.get("eir", "workers") or os.cpu_count() or 1)
        self.eir_listen = config.get("eir", "listen")
        self.api_listen = config.get("api", "listen")
        self.eir_tls = bool(config.get("eir", "tls_cert"))
        self.started = time.time()
        self.ready_at: float | None = None
        self.stopping = False
        self._signals: deque[int] = deque()
        self._wake = threading.Event()
        self._store_ok = False
        self._store_lock = threading.Lock()
        self._store_problem: str | None = None
        self.figures = OpsFigures()
        self._reader: OpsReader | None = None
        self.run_dir: Path | None = None
        self._own_run_dir = False
        self.board: Board | None = None
        self.leadership: Leadership | None = None
        self.eir: EirChild | None = None
        self.s13: S13Child | None = None
        self.s13_listen = config.get("s13", "listen")
        self.api: ApiListener | None = None
        self.api_error: str | None = None
        self.jobs: Any = None
        self.coordinator: Any = None
        self._telemetry_stop = threading.Event()
        self._telemetry = threading.Thread(target=self._telemetry_loop, name="telemetry",
                                           daemon=True)
        self._telemetry_beat = time.monotonic()
        self._last_watchdog = 0.0
        self._watchdog_problem: str | None = None
        self._last_status = 0.0

    # -- start ----------------------------------------------------------------------------------

    def _check_config(self) -> None:
        if split_listen(self.eir_listen) == split_listen(self.api_listen):
            raise BadInput(f"[eir] listen and [api] listen are both {self.eir_listen}",
                           "give the attach check and the police API different ports")
        if self.s13_listen:
            from imeisync.entrypoints.s13 import check_transport, settings_from

            settings_from(self.config)
            check_transport(self.config)
            for section, listen in (("eir", self.eir_listen), ("api", self.api_listen)):
                if split_listen(self.s13_listen) == split_listen(listen):
                    raise BadInput(f"[s13] listen and [{section}] listen are both {listen}",
                                   "give S13 its own port (Diameter's is 3868)")
        for section in ("eir", "api"):
            cert, key = self.config.get(section, "tls_cert"), self.config.get(section, "tls_key")
            if bool(cert) != bool(key):
                raise BadInput(f"[{section}] tls_cert and tls_key must be set together")
            for name, value in (("tls_cert", cert), ("tls_key", key)):
                if value and not Path(value).is_file():
                    raise BadInput(f"[{section}] {name} {value} does not exist",
                                   "point it at a PEM file, or leave both empty")

    def _prepare_run_dir(self) -> None:
        runtime = os.environ.get("RUNTIME_DIRECTORY")  # systemd RuntimeDirectory=
        if runtime:
            self.run_dir = Path(runtime.split(":")[0]) / "board"
        else:
            self.run_dir = Path(tempfile.mkdtemp(prefix="imeisync-run-"))
            self._own_run_dir = True
        self.board = Board(self.run_dir)
        self.board.reset()

    def store_ready(self) -> bool:
        """The database can be used. A missing SQLite file while a persisted attach index
        exists is an outage (unmounted volume, moved file), never a fresh install: nothing here
        creates an empty database in its place (the attach check serves the index meanwhile)."""
        if self._store_ok:
            return True
        with self._store_lock:  # threads ask at once; one opens the database
            return self._open_store()

    def _open_store(self) -> bool:
        if self._store_ok:
            return True
        url = make_url(self.config.database_url)
        index_file = self.config.get("eir", "index_file")
        if (url.get_backend_name() == "sqlite" and url.database
                and not Path(url.database).exists() and index_file
                and Path(index_file).exists()):
            problem = (f"database file {url.database} is missing while the attach index "
                       f"{index_file} exists: not creating an empty database; restore the file "
                       "(the attach check answers from the index meanwhile)")
        else:
            try:
                self.app.db  # noqa: B018 -- opens it and creates the schema of an empty one
                self._store_ok = True
                if self._store_problem:
                    log.warning("database %s usable again", describe_url(self.config.database_url))
                self._store_problem = None
                return True
            except ImeisyncError as exc:
                problem = str(exc)
        if problem != self._store_problem:
            event(log, logging.ERROR, "database.unavailable", problem)
        self._store_problem = problem
        return False

    def _load_police_keys(self) -> None:
        try:
            keys = self.app.trusted_keys
        except ImeisyncError as exc:
            event(log, logging.ERROR, "police_keys.unavailable",
                  f"trusted police keys not loaded: {exc}; signed orders are refused until "
                  "this is fixed and the daemon reloaded (SIGHUP)")
            return
        log.info("trusted police keys: %d (%s)", len(keys), ", ".join(keys.kids) or "none")

    def _api_app(self) -> ASGIApp | None:
        try:
            from imeisync.entrypoints.api import create_app
        except ImportError:
            log.info("police API not installed in this build: the API listener serves "
                     "/healthz and /metrics only")
            return None
        try:
            return create_app(self.app, ops=False)
        except Exception as exc:  # the attach check must come up regardless
            self.api_error = f"{type(exc).__name__}: {exc}"
            log.exception("police API could not be built; serving /healthz and /metrics only")
            return None

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT; the exit status."""
        self._check_config()
        self.leadership = leadership_for(self.config.database_url)
        try:
            self._start()
            return self._serve()
        finally:
            self._cleanup()

    def _start(self) -> None:
        assert self.leadership is not None
        if hasattr(self.leadership, "acquire"):
            self.leadership.acquire()  # SQLite: refuse a second daemon on the same file
        check_free("eir", self.eir_listen)
        check_free("api", self.api_listen)
        if self.s13_listen and self.config.get("s13", "transport") == "tcp":
            check_free("s13", self.s13_listen)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._prepare_run_dir()
        assert self.board is not None
        event(log, logging.INFO, "daemon.starting", "imeisync daemon starting",
              node=node_name(), config=self.config.source,
              database=describe_url(self.config.database_url), eir=self.eir_listen,
              eir_workers=self.expected_workers, api=self.api_listen,
              leadership=self.leadership.mode, board=str(self.run_dir))
        self.notifier.status("starting: loading the attach index")
        self.eir = EirChild(self.config, self.board)
        self.eir.start()  # first, from the main thread, before any other thread exists
        if self.s13_listen:
            self.s13 = S13Child(self.config, self.board)
            self.s13.start()
        self.store_ready()
        self._load_police_keys()
        self._reader = OpsReader(self.app.db) if self._store_ok else None
        inner = self._api_app()
        tls = None
        if self.config.get("api", "tls_cert"):
            tls = (self.config.get("api", "tls_cert"), self.config.get("api", "tls_key"))
        self.api = ApiListener(OpsFront(inner, self.health, self.metrics_text),
                               self.api_listen, tls, (self.config.get("log", "format"),
                                                      self.config.get("log", "level"))).start()
        from imeisync.entrypoints.jobs import Coordinator, Jobs

        leadership = self.leadership
        self.jobs = Jobs(self.app, lambda: leadership.is_leader, self.store_ready)
        self.jobs.start()
        elect_every = min(float(self.config.get("sync", "push_interval")), 5.0)
        self.coordinator = Coordinator(self.app, self.jobs, self.leadership,
                                       elect_every=elect_every,
                                       store_ready=self.store_ready).start()
        self._telemetry.start()

    # -- the main loop --------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)
        self._wake.set()

    def _serve(self) -> int:
        interval = watchdog_interval()
        while True:
            self._wake.wait(0.25)
            self._wake.clear()
            while self._signals:
                signum = self._signals.popleft()
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    return self.shutdown(signal.Signals(signum).name)
            code = self._supervise_eir()
            if code is None and self.s13 is not None:
                code = self._supervise_s13()
            if code is not None:
                return code
            if self.api is not None and not self.api.alive():
                event(log, logging.CRITICAL, "daemon.failed",
                      f"the police API listener on {self.api_listen} stopped: "
                      f"{self.api.error}; exiting so the service manager restarts the daemon")
                self.shutdown("api listener failed", push=True)
                return 1
            if self.ready_at is None:
                self._check_ready()
            if interval:
                self._watchdog(interval)
            self._status_line()

    def _supervise_eir(self) -> int | None:
        assert self.eir is not None
        if self.eir.restart_at is not None:
            if time.monotonic() >= self.eir.restart_at:
                self.eir.start()
            return None
        code = self.eir.reap()
        if code is None:
            return None
        if self.ready_at is None or self.eir.crash_looping():
            event(log, logging.CRITICAL, "daemon.failed",
                  f"the attach-check server keeps exiting (status {code}); giving up so the "
                  "service manager restarts the daemon — see its messages above", status=code)
            self.shutdown("attach-check server failing", push=True)
            return 1
        # At once the first time (the network is waiting), then backing off: 2, 4, 8… 30 s.
        deaths = len(self.eir.deaths)
        delay = 0.0 if deaths == 1 else min(30.0, 2.0 ** (deaths - 1))
        event(log, logging.ERROR, "eir.died",
              f"the attach-check server exited with status {code}; restarting it"
              + (f" in {delay:.0f}s" if delay else " now"), status=code)
        self.eir.restart_at = time.monotonic() + delay
        return None

    def _supervise_s13(self) -> int | None:
        """The S13 listener as the attach-check server: restarted at once, then backing off;
        a crash loop stops the daemon so the service manager restarts it whole."""
        assert self.s13 is not None
        if self.s13.restart_at is not None:
            if time.monotonic() >= self.s13.restart_at:
                self.s13.start()
            return None
        code = self.s13.reap()
        if code is None:
            return None
        if self.s13.crash_looping():
            event(log, logging.CRITICAL, "daemon.failed",
                  f"the S13 listener keeps exiting (status {code}); giving up so the service "
                  "manager restarts the daemon — see its messages above", status=code)
            self.shutdown("S13 listener failing", push=True)
            return 1
        deaths = len(self.s13.deaths)
        delay = 0.0 if deaths == 1 else min(30.0, 2.0 ** (deaths - 1))
        event(log, logging.ERROR, "s13.died",
              f"the S13 listener exited with status {code}; restarting it"
              + (f" in {delay:.0f}s" if delay else " now"), status=code)
        self.s13.restart_at = time.monotonic() + delay
        return None

    def _s13_state(self) -> dict[str, Any] | None:
        """The S13 listener's last figures (None when S13 is off); ``answering`` when it
        listens with its index loaded and wrote within ``WORKER_STALE_AFTER``."""
        if not self.s13_listen or self.board is None:
            return None
        from imeisync.entrypoints.s13 import read_snapshots

        snaps = read_snapshots(self.board.folder)
        snap = snaps[0] if snaps else {}
        answering = bool(snap.get("ready")) and snap.get("age", 1e9) < WORKER_STALE_AFTER \
            and self.s13 is not None and self.s13.alive()
        return {"answering": answering, "listen": snap.get("listen") or self.s13_listen,
                "transport": self.config.get("s13", "transport"),
                "peers": snap.get("peers") or {}, "connections": snap.get("connections", 0),
                "snapshot": snap}

    def _ready_workers(self) -> list[dict[str, Any]]:
        assert self.board is not None
        return [w for w in self.board.workers() if (w.get("health") or {}).get("ready")
                and w["age"] < WORKER_STALE_AFTER]

    def _check_ready(self) -> None:
        ready = self._ready_workers()
        if len(ready) < self.expected_workers:
            return
        eir = probe(self.eir_listen, tls=self.eir_tls)
        api = probe(self.api_listen, tls=bool(self.config.get("api", "tls_cert")))
        if eir is None or eir[0] != 200 or api is None:
            return
        s13 = self._s13_state()
        if s13 is not None and not s13["answering"]:
            return  # READY=1 only once S13 answers too
        self.ready_at = time.time()
        health = ready[0]["health"]
        status = (f"serving: {health.get('entries', 0)} blocklist entries at change "
                  f"{health.get('seq')}; attach check {self.eir_listen}, API {self.api_listen}")
        self.notifier.ready(status)
        event(log, logging.INFO, "daemon.ready", status, seconds=round(
            self.ready_at - self.started, 2), workers=len(ready))

    def _healthy(self) -> str | None:
        """Why the daemon is hung (no watchdog ping), or None. Outages are not hangs."""
        if self.eir is None or (not self.eir.alive() and self.eir.restart_at is None):
            return "the attach-check server is not running"
        if self.eir.alive() and self.ready_at is not None and probe(
                self.eir_listen, tls=self.eir_tls, timeout=5) is None:
            return f"the attach-check server on {self.eir_listen} does not answer"
        if self.s13 is not None and not self.s13.alive() and self.s13.restart_at is None:
            return "the S13 listener is not running"
        if self.api is None or not self.api.alive():
            return "the police API listener is not running"
        if probe(self.api_listen, tls=bool(self.config.get("api", "tls_cert")),
                 timeout=5) is None:
            return f"the police API listener on {self.api_listen} does not answer"
        if self.coordinator is None or not self.coordinator.alive():
            return "the leader-election thread is stuck"
        if time.monotonic() - self._telemetry_beat > 60:
            return "the telemetry thread is stuck"
        return None

    def _watchdog(self, interval: float) -> None:
        now = time.monotonic()
        if now - self._last_watchdog < interval:
            return
        self._last_watchdog = now
        problem = self._healthy()
        if problem is None:
            self.notifier.watchdog()
            if self._watchdog_problem:
                log.warning("healthy again; watchdog pings resumed")
        elif problem != self._watchdog_problem:
            event(log, logging.ERROR, "watchdog.withheld",
                  f"not pinging the watchdog: {problem}; systemd restarts the daemon if this "
                  "lasts WatchdogSec")
        self._watchdog_problem = problem

    def _status_line(self) -> None:
        now = time.monotonic()
        if self.ready_at is None or now - self._last_status < 10:
            return
        self._last_status = now
        ready = self._ready_workers()
        entries = ready[0]["health"].get("entries", 0) if ready else 0
        f = self.figures
        leader = "leader" if self.coordinator and self.coordinator.is_leader else "follower"
        registry = {True: "registry ok", False: "registry FAILING", None: "registry not yet "
                    "contacted"}[f.registry_reachable()]
        self.notifier.status(f"{entries} entries, {len(ready)}/{self.expected_workers} workers "
                             f"ready, {leader}, {registry}, outbox "
                             f"{f.outbox.get('pending', 0) + f.outbox.get('sent', 0)} unsent")

    # -- SIGHUP ---------------------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            done = self.app.reload()
            if "trusted_keys" not in self.app.__dict__:
                self._load_police_keys()
                done["police_keys"] = self.app.trusted_keys.kids if \
                    "trusted_keys" in self.app.__dict__ else None
        except ImeisyncError as exc:
            event(log, logging.ERROR, "reload.failed",
                  f"reload failed, the previous keys and tokens stay in force: {exc}")
        else:
            keys = done.get("police_keys")
            event(log, logging.INFO, "reload.done",
                  f"reloaded: {len(keys) if keys is not None else 'no'} trusted police key(s)"
                  f"{' and the API tokens' if done.get('tokens') else ''}",
                  police_keys=",".join(keys or []))
        self.notifier.ready("reloaded; serving")

    # -- SIGTERM --------------------------------------------------------------------------------

    def shutdown(self, reason: str, *, push: bool = True) -> int:
        self.stopping = True
        started = time.monotonic()
        self.notifier.stopping(f"stopping ({reason})")
        event(log, logging.INFO, "daemon.stopping",
              f"stopping ({reason}): no new connections, finishing requests in flight",
              reason=reason)
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.jobs is not None:
            self.jobs.shutdown()
        if self.s13 is not None:
            self.s13.terminate()  # it sends DPR to every peer, then exits
        if self.eir is not None:
            self.eir.terminate()
        if self.api is not None:
            self.api.stop()
        if self.eir is not None:
            self.eir.wait(LISTENER_DRAIN + 5)
        if self.s13 is not None:
            self.s13.wait(10)
        if self.api is not None and not self.api.wait(LISTENER_DRAIN + 5):
            log.error("police API listener did not stop within %ss", LISTENER_DRAIN + 5)
        deadline = time.monotonic() + JOB_DRAIN
        while self.jobs is not None and self.jobs.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        leading = self.leadership is not None and self.leadership.is_leader
        if push and leading and self.jobs is not None and self._store_ok:
            try:
                message = self.jobs.final_push(FINAL_PUSH)
                event(log, logging.INFO, "daemon.final_push", f"last push: {message}")
            except ImeisyncError as exc:
                event(log, logging.WARNING, "daemon.final_push",
                      f"last push failed: {exc}; the changes stay in the outbox and are sent "
                      "by the next leader or the next start")
            except Exception:
                log.exception("last push failed unexpectedly")
        still = self.jobs.running() if self.jobs is not None else []
        event(log, logging.INFO, "daemon.stopped",
              f"stopped in {time.monotonic() - started:.1f}s"
              + (f"; abandoning running job(s) {', '.join(still)} (their transactions roll "
                 "back)" if still else ""), seconds=round(time.monotonic() - started, 2))
        self._abandoned = bool(still)
        return 0

    def _cleanup(self) -> None:
        self._telemetry_stop.set()
        if self.coordinator is not None and not self.stopping:
            self.coordinator.stop()
        if self.jobs is not None:
            self.jobs.shutdown()
            self.jobs.close()
        if self.eir is not None and self.eir.alive():
            self.eir.terminate()
            self.eir.wait(LISTENER_DRAIN + 5)
        if self.s13 is not None and self.s13.alive():
            self.s13.terminate()
            self.s13.wait(10)
        if self.api is not None and self.api.alive():
            self.api.stop()
            self.api.wait(5)
        if self.leadership is not None:
            with contextlib.suppress(Exception):
                self.leadership.release()
        with contextlib.suppress(Exception):
            self.app.close()
        if self._own_run_dir and self.run_dir is not None:
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.notifier.close()
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        if getattr(self, "_abandoned", False):
            os._exit(0)  # a job thread would keep the interpreter from exiting

    # -- figures --------------------------------------------------------------------------------

    def _telemetry_loop(self) -> None:
        last_read = 0.0
        while not self._telemetry_stop.wait(1.0):
            self._telemetry_beat = time.monotonic()
            try:
                job_ran = self.jobs is not None and self.jobs.finished.is_set()
                if (job_ran or time.monotonic() - last_read >= 5) and self.store_ready():
                    if job_ran:
                        self.jobs.finished.clear()
                    if self._reader is None:
                        self._reader = OpsReader(self.app.db)
                    self.figures = self._reader.read()
                    last_read = time.monotonic()
                if self.board is not None:
                    self.board.write_daemon(self._summary(), self._daemon_metrics())
            except Exception:
                log.exception("telemetry update failed")

    def _leader_info(self) -> dict[str, Any]:
        info = self.leadership.describe() if self.leadership is not None else {}
        info["this_node"] = bool(self.coordinator and self.coordinator.is_leader)
        if self.figures.leader:
            info["last_elected"] = self.figures.leader
        return info

    def _summary(self) -> dict[str, Any]:
        return {"sync": self.figures.summary(), "leader": self._leader_info()}

    def _daemon_metrics(self) -> bytes:
        jobs = self.jobs.stats if self.jobs is not None else {}
        workers = self.board.workers() if self.board is not None else []
        families = ops_families(self.figures, jobs, self._leader_info(), workers,
                                self.expected_workers)
        s13 = self._s13_state()
        if s13 is not None and s13["snapshot"]:  # peers, answers, refusals: both listeners
            from imeisync.entrypoints.s13 import S13Figures

            families += list(S13Figures(s13["snapshot"]).own())
        return render(families) + generate_latest(REGISTRY)

    def metrics_text(self) -> bytes:
        """``/metrics`` on the API listener: every attach-check worker (N5g-eir and S13, one
        family each, label ``interface``) and the daemon."""
        assert self.board is not None
        s13 = self._s13_state()
        if s13 is None or not s13["snapshot"]:
            return render(eir_families(self.board)) + self._daemon_metrics()
        from imeisync.entrypoints.s13 import S13Figures
        from imeisync.entrypoints.telemetry import WorkerFigures, merge

        snap = S13Figures(s13["snapshot"])
        shared = merge([*(WorkerFigures(w) for w in self.board.workers()),
                        _Shared(snap)])
        return render(shared) + self._daemon_metrics()

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz`` on the API listener: 200 while attach checks can be answered."""
        ready = self._ready_workers()
        freshest = ready[0]["health"] if ready else {}
        answering = bool(ready)
        if not answering and self.eir is not None and self.eir.alive():
            # No fresh worker figures (a stuck snapshot thread?): ask the listener itself.
            answer = probe(self.eir_listen, tls=self.eir_tls, timeout=1)
            if answer is not None and answer[0] == 200:
                answering = True
                with contextlib.suppress(ValueError, KeyError):
                    freshest = json.loads(answer[1])["attach_index"]
        f = self.figures
        registry_ok = f.registry_reachable()
        if self.stopping:
            status, answering = "stopping", False  # load balancers: drain this node
        elif not answering:
            status = "starting" if self.ready_at is None else "unavailable"
        elif f.database_reachable and freshest.get("database_reachable") and registry_ok \
                is not False and not f.reconcile_refused and (f.audit or {}).get("ok", True):
            status = "ok"
        else:
            status = "degraded"
        keys = self.app.__dict__.get("trusted_keys")
        body = {
            "status": status,
            "attach_check": {
                "answering": answering, "listen": self.eir_listen,
                "workers": self.expected_workers, "ready_workers": len(ready),
                **{k: freshest.get(k) for k in ("entries", "blocked", "tracked", "seq",
                                                 "source", "last_refresh",
                                                 "staleness_seconds")},
            },
            "database": {"reachable": f.database_reachable and bool(
                freshest.get("database_reachable", True)),
                "last_error": f.database_error or freshest.get("last_error")
                or self._store_problem},
            "registry": {"url": self.config.get("registry", "url"), **f.summary()},
            "leader": self._leader_info(),
            "police_keys": {"loaded": keys is not None,
                            "kids": keys.kids if keys is not None else []},
            "api": {"police_api": self.api is not None and self.api.asgi is not None
                    and getattr(self.api.asgi, "inner", None) is not None,
                    "error": self.api_error},
            "uptime_seconds": round(time.time() - self.started),
        }
        s13 = self._s13_state()
        if s13 is not None:
            body["s13"] = {k: v for k, v in s13.items() if k != "snapshot"}
            if not s13["answering"] and body["status"] == "ok":
                body["status"] = "degraded"
        return (200 if answering else 503), body


class _Shared:
    """The S13 families the N5g-eir workers also export, as a collector for ``merge``."""

    def __init__(self, figures: Any):
        self.figures = figures

    def collect(self) -> Any:
        return self.figures.shared()


# -- entry points --------------------------------------------------------------------------------


def run(config: Config) -> int:
    """``imeisync run`` (the CLI command calls this)."""
    logs.configure(config.get("log", "format"), config.get("log", "level"))
    logs.in_daemon()
    daemon = Daemon(config)
    return daemon.run()


def main(argv: list[str] | None = None) -> None:
    """``python -m imeisync.entrypoints.daemon eir [--config PATH]`` (the supervisor's child)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imeisync.entrypoints.daemon")
    parser.add_argument("role", choices=["eir"])
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    try:
        eir_child_main(args.config)
    except ImeisyncError as error:
        print(f"imeisync: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
