"""The supervisor of ``imeisync run``: start, signals, watchdog, readiness, shutdown.

See the package's docstring for the process layout and the signals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from imeisync.adapters.leader import Leadership, leadership_for, node_name
from imeisync.adapters.systemd import Notifier, watchdog_interval
from imeisync.bootstrap import App
from imeisync.config import Config
from imeisync.domain.errors import BadInput, ImeisyncError
from imeisync.entrypoints import logs
from imeisync.entrypoints.asgi import ASGIApp
from imeisync.entrypoints.daemon.api_listener import ApiListener, OpsFront
from imeisync.entrypoints.daemon.children import LISTENER_DRAIN, Child, EirChild
from imeisync.entrypoints.daemon.health import DaemonHealth
from imeisync.entrypoints.daemon.ports import check_free, probe
from imeisync.entrypoints.daemon.records import RunFolder, run_folder
from imeisync.entrypoints.daemon.s13_child import S13Child, check_s13_config
from imeisync.entrypoints.logs import event
from imeisync.entrypoints.telemetry import Board
from imeisync.services.operations import OpsFigures, OpsReader
from imeisync.store.db import describe_url

log = logging.getLogger("imeisync.daemon")

JOB_DRAIN = 10.0  # seconds to let running jobs finish at shutdown
FINAL_PUSH = 10.0  # seconds the last push may wait for a running one
PING_EVERY = 0.5  # seconds between two probes of each child
PING_TIMEOUT = 1.0
HUNG_AFTER = 6.0  # seconds without an answer before a child that answered is replaced


# -- the supervisor ------------------------------------------------------------------------------


class Daemon(DaemonHealth):
    """The supervisor: starts the children and the listener, handles signals, pings the
    watchdog, says when it is ready, shuts down in order."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None):
        self.config = config
        self.app = App(config)
        self.notifier = notifier or Notifier()
        self.expected_workers = config.eir.workers or os.cpu_count() or 1
        self.eir_listen = config.eir.listen.text
        self.api_listen = config.api.listen.text
        self.eir_tls = config.eir.tls
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
        self.s13: S13Child | None = None  # [s13] listen set
        self.children: list[Child] = []  # supervised processes; the attach-check server first
        self.runs = RunFolder(run_folder(config))
        self.hung_after = hung_after(watchdog_interval())
        self._prober = threading.Thread(target=self._probe_loop, name="child-probe",
                                        daemon=True)
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
        if self.config.eir.listen.address == self.config.api.listen.address:
            raise BadInput(f"[eir] listen and [api] listen are both {self.eir_listen}",
                           "give the attach check and the police API different ports")
        self.config.eir.tls_files()  # the files exist (both-or-neither was checked at load)
        self.config.api.tls_files()
        check_s13_config(self.config)

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
        index_file = self.config.eir.index_file
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
        self.runs.stop_leftovers()  # what a crash of a previous run left holding our ports
        check_free("eir", self.eir_listen)
        check_free("api", self.api_listen)
        s13_listen = self.config.s13.listen
        if s13_listen is not None and self.config.s13.transport == "tcp":
            check_free("s13", s13_listen.text)
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
        self.eir = EirChild(self.config, self.board, self.runs)
        self.children.append(self.eir)
        self.eir.start()  # first, from the main thread, before any other thread exists
        if self.config.s13.listen is not None:
            self.s13 = S13Child(self.config, self.board, self.runs)
            self.children.append(self.s13)
            self.s13.start()
        self._prober.start()
        self.store_ready()
        self._load_police_keys()
        self._reader = self.app.ops_reader() if self._store_ok else None
        inner = self._api_app()
        tls = self.config.api.tls_files()
        self.api = ApiListener(OpsFront(inner, self.health, self.metrics_text),
                               self.api_listen, tls, (self.config.log.format,
                                                      self.config.log.level)).start()
        from imeisync.entrypoints.jobs import Coordinator, Jobs

        leadership = self.leadership
        self.jobs = Jobs(self.app, lambda: leadership.is_leader, self.store_ready)
        self.jobs.start()
        elect_every = min(self.config.sync.push_interval, 5.0)
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
            for child in self.children:
                code = self._supervise(child)
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

    def _supervise(self, child: Child) -> int | None:
        """Start, replace or restart one child; an exit status when the daemon must give up."""
        if child.restart_at is not None:
            if time.monotonic() >= child.restart_at:
                child.start()
            return None
        if child.hung(self.hung_after):
            event(log, logging.ERROR, f"{child.slug}.hung",
                  f"the {child.kind} (pid {child.pid}) has not answered on {child.listen} for "
                  f"{self.hung_after:.0f}s; killing it to replace it", pid=child.pid)
            child.kill()
        code = child.reap()
        if code is None:
            return None
        if self.ready_at is None or child.crash_looping():
            event(log, logging.CRITICAL, "daemon.failed",
                  f"the {child.kind} keeps exiting (status {code}); giving up so the "
                  "service manager restarts the daemon — see its messages above", status=code)
            self.shutdown(f"{child.kind} failing", push=True)
            return 1
        # At once the first time (the network is waiting), then backing off: 2, 4, 8… 30 s.
        deaths = len(child.deaths)
        delay = 0.0 if deaths == 1 else min(30.0, 2.0 ** (deaths - 1))
        event(log, logging.ERROR, f"{child.slug}.died",
              f"the {child.kind} exited with status {code}; restarting it"
              + (f" in {delay:.0f}s" if delay else " now"), status=code)
        child.restart_at = time.monotonic() + delay
        return None

    def _probe_loop(self) -> None:
        """Ask each child whether it answers, off the main loop (a hung child makes a probe
        wait for its whole timeout)."""
        while not self.stopping:
            for child in list(self.children):
                child.check(PING_TIMEOUT)
            time.sleep(PING_EVERY)

    def _check_ready(self) -> None:
        ready = self._ready_workers()
        if len(ready) < self.expected_workers:
            return
        eir = probe(self.eir_listen, tls=self.eir_tls)
        api = probe(self.api_listen, tls=self.config.api.tls)
        if eir is None or eir[0] != 200 or api is None:
            return
        if self.s13 is not None and not self.s13.state()["answering"]:
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
        if not self.children:
            return "the attach-check server is not running"
        for child in self.children:
            if not child.alive() and child.restart_at is None:
                return f"the {child.kind} is not running"
            if child.alive() and self.ready_at is not None and not child.answering(
                    2 * PING_EVERY + PING_TIMEOUT):
                return f"the {child.kind} on {child.listen} does not answer"
        if self.api is None or not self.api.alive():
            return "the police API listener is not running"
        if probe(self.api_listen, tls=self.config.api.tls,
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
        for child in sorted(self.children, key=lambda c: not c.stop_first):
            child.terminate()  # S13 first: its DPRs go out while the others drain
        if self.api is not None:
            self.api.stop()
        for child in self.children:
            child.wait(LISTENER_DRAIN + 5)
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
        for child in self.children:
            if child.alive():
                child.terminate()
                child.wait(LISTENER_DRAIN + 5)
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



# -- entry points --------------------------------------------------------------------------------


def run(config: Config) -> int:
    """``imeisync run`` (the CLI command calls this)."""
    logs.configure(config.log.format, config.log.level)
    logs.in_daemon()
    daemon = Daemon(config)
    return daemon.run()


def hung_after(watchdog: float | None) -> float:
    """How long a child may go unanswering before it is replaced: HUNG_AFTER, and under a
    systemd watchdog soon enough that the replacement starts within half of WatchdogSec (the
    ping interval) — systemd would otherwise restart the whole daemon."""
    if watchdog is None:
        return HUNG_AFTER
    return max(2 * PING_EVERY + PING_TIMEOUT,
               min(HUNG_AFTER, watchdog - PING_EVERY - PING_TIMEOUT - 0.25))
