"""The supervisor's children: processes it starts, watches, restarts and stops.

``Child`` is what every kind has in common (uvicorn's ``supervisors.multiprocess.Process`` is the
model): ``start()``, ``alive()``, ``ping()``, ``terminate()``, ``wait()`` (join with a bound, then
SIGKILL of the child's whole process group), ``reap()`` and the crash bookkeeping the supervisor's
restart back-off reads. A kind only says how it is started (``command()``) and how it is asked
whether it answers (``ping()``). Each child runs in its own session, so its process group is its
own: Granian's workers die with their master when the group is killed.

The child side: ``die_with_parent()`` at the top of every child's ``main``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from imeisync.config import Config, load_config
from imeisync.entrypoints import logs
from imeisync.entrypoints.daemon.ports import probe
from imeisync.entrypoints.daemon.records import RunFolder
from imeisync.entrypoints.telemetry import RUN_DIR_ENV, Board

log = logging.getLogger("imeisync.daemon")

LISTENER_DRAIN = 20  # seconds for in-flight requests at shutdown (both listeners)

CRASHES = 5  # deaths of one child within CRASH_WINDOW before the supervisor gives up
CRASH_WINDOW = 300.0
SUPERVISOR_ENV = "IMEISYNC_SUPERVISOR_PID"
MASTER_ENV = "IMEISYNC_GRANIAN_MASTER_PID"  # set by the attach-check master for its workers
PARENT_CHECK = 0.5  # seconds between two looks at whether the parent is still there
PR_SET_PDEATHSIG = 1
# The service manager's variables are for the supervisor alone.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


# -- the child side ------------------------------------------------------------------------------


def die_with_parent(expected: int | None = None) -> None:
    """Ask the kernel for SIGTERM when this process's parent dies, however it dies (Linux);
    exit at once if it already has. ``expected``: the parent's pid (default: the supervisor's,
    from the environment). The kernel's signal is per thread and lost if the parent died
    before the request; ``watch_parent`` is the other half."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if expected is None:
        expected = supervisor_pid()
    if expected is not None and os.getppid() != expected:
        os._exit(0)  # the parent died before the request took effect


def supervisor_pid() -> int | None:
    value = os.environ.get(SUPERVISOR_ENV, "")
    return int(value) if value.isdigit() else None


def watch_parent(expected: int, bound: float, *, every: float = PARENT_CHECK) -> threading.Thread:
    """A thread that notices the death of this process's parent ``expected`` (re-parented:
    ``getppid()`` changes) within ``every`` seconds, sends this process SIGTERM (its own
    graceful stop, bounded by its own rules) and, ``bound`` seconds later, ends it outright."""

    def watch() -> None:
        while os.getppid() == expected:
            time.sleep(every)
        log.warning("parent process %d is gone; stopping", expected)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(bound)
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def bound_granian_shutdown(server: Any, drain: float) -> None:
    """Make a Granian master's graceful stop end within ``drain`` seconds: once it is asked to
    stop, a thread SIGKILLs every worker still alive after ``drain`` (Granian then finishes its
    shutdown and exits), and ends the master itself if that did not suffice.

    Granian's own ``workers_kill_timeout`` is not used: 2.8 reports (and SIGKILLs by pid) a
    worker its watcher thread already reaped. Without a bound, its master waits for each
    worker without a timeout, and a worker that missed its SIGTERM keeps it waiting forever.
    """
    stopping = threading.Event()
    interrupt = server.signal_handler_interrupt

    def on_interrupt(*args: Any, **kwargs: Any) -> None:
        stopping.set()
        interrupt(*args, **kwargs)

    def guard() -> None:
        stopping.wait()
        time.sleep(drain)
        for worker in list(getattr(server, "wrks", [])):
            if worker.is_alive():
                log.error("attach-check worker %s did not stop within %ss; killing it",
                          worker.inner.pid, drain)
                with contextlib.suppress(OSError):
                    os.kill(worker.inner.pid, signal.SIGKILL)
        time.sleep(5.0)
        os._exit(1)  # still here: Granian's shutdown itself is stuck

    server.signal_handler_interrupt = on_interrupt  # read by Granian when it installs handlers
    threading.Thread(target=guard, name="shutdown-bound", daemon=True).start()


def leave_during_startup() -> None:
    """In a freshly forked Granian worker: exit at once on SIGTERM/SIGINT until Granian installs
    the worker's own handlers (after the app factory returns).

    A forked worker inherits its master's Python handler, which only sets a flag on the
    master's (copied) server object: a SIGTERM that reaches a worker while it loads its index
    would be lost, the worker would go on serving, and its master would wait for it forever.
    Nothing has been served yet, so there is nothing to drain.
    """

    def leave(_signum: int, _frame: Any) -> None:
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, leave)


# -- the supervisor side -------------------------------------------------------------------------


class Child:
    """One supervised process (and whatever it forks): started, watched, restarted, stopped."""

    kind = "child"  # names it in logs
    slug = "child"  # names its record in the run folder

    def __init__(self, config: Config, board: Board, runs: RunFolder | None = None):
        self.config = config
        self.board = board
        self.runs = runs
        self.proc: subprocess.Popen[bytes] | None = None
        self.deaths: deque[float] = deque()
        self.restart_at: float | None = None
        self.answered_at: float | None = None  # last answer to ping() since this start

    def command(self) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        """What ``start()`` logs after the pid."""
        return ""

    def ping(self, timeout: float = 2.0) -> bool:
        """Whether the child answers (a kind asks it in its own protocol)."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY}
        env[RUN_DIR_ENV] = str(self.board.folder)
        env[SUPERVISOR_ENV] = str(os.getpid())
        return env

    def config_args(self) -> list[str]:
        if self.config.source and Path(self.config.source).is_file():
            return ["--config", str(Path(self.config.source).resolve())]
        return []

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), env=self.environment(),
                                     start_new_session=True)
        if self.runs is not None:
            self.runs.record(self.slug, self.proc.pid)  # for the next run, should this one crash
        self.restart_at = None
        self.answered_at = None
        log.info("%s started (pid %d)%s", self.kind, self.proc.pid, self.describe())

    def check(self, timeout: float) -> None:
        """Ping it (the supervisor's probe thread calls this); note when it answered."""
        if self.alive() and self.ping(timeout):
            self.answered_at = time.monotonic()

    def hung(self, after: float) -> bool:
        """It answered since it started, then stopped answering for ``after`` seconds."""
        answered = self.answered_at
        return self.alive() and answered is not None and time.monotonic() - answered > after

    def kill(self) -> None:
        """SIGKILL its whole process group (a hung child cannot drain anything)."""
        if self.proc is not None:
            self._kill_group()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        proc = self.proc  # once: the probe thread asks while the main loop may reap
        return proc is not None and proc.poll() is None

    def reap(self) -> int | None:
        """The exit status if it died (its whole process group is then killed), else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self._kill_group()  # workers left behind by a dead master
        self._gone()
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > CRASH_WINDOW:
            self.deaths.popleft()
        return code

    def crash_looping(self) -> bool:
        return len(self.deaths) >= CRASHES

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """Join within ``timeout`` seconds, else SIGKILL the group; whether it stopped itself."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("%s did not stop within %ss; killing it", self.kind, timeout)
            self._kill_group()
            self.proc.wait(timeout=5)
            self._gone()
            return False
        self._kill_group()  # nothing should be left; make sure
        self._gone()
        return True

    def _gone(self) -> None:
        self.proc = None
        self.answered_at = None
        if self.runs is not None:
            self.runs.forget(self.slug)

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class EirChild(Child):
    """The attach-check server: a Granian master ([eir] listen) and its workers."""

    kind = "attach-check server"
    slug = "eir"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "imeisync.entrypoints.daemon", "eir", *self.config_args()]

    def describe(self) -> str:
        return (f" on {self.config.get('eir', 'listen')} with "
                f"{self.config.get('eir', 'workers') or os.cpu_count()} worker(s)")

    def ping(self, timeout: float = 2.0) -> bool:
        return probe(self.config.get("eir", "listen"), tls=bool(self.config.get("eir", "tls_cert")),
                     timeout=timeout) is not None


def eir_child_main(config_path: str | None) -> None:
    """``python -m imeisync.entrypoints.daemon eir [--config PATH]``: the attach-check server
    as the daemon runs it. Not meant to be started by hand (use ``imeisync run``)."""
    from imeisync.entrypoints import eir

    die_with_parent()
    supervisor = supervisor_pid()
    if supervisor is not None:
        watch_parent(supervisor, LISTENER_DRAIN + 5)
    config = load_config(config_path)
    fmt, level = config.get("log", "format"), config.get("log", "level")
    logs.configure(fmt, level)
    eir._prepare_store(config)
    os.environ[MASTER_ENV] = str(os.getpid())  # inherited by the forked workers
    srv = eir.server(config, target="imeisync.entrypoints.daemon.eir_worker:eir_worker_app",
                     respawn_failed_workers=True,
                     log_dictconfig=logs.granian_log_config(fmt, level))
    bound_granian_shutdown(srv, LISTENER_DRAIN)
    srv.serve()


def worker_startup() -> None:
    """First thing in each attach-check worker: leave on a stop signal until Granian takes
    over, and stop when the master is gone (the parent-death signal is cleared by fork)."""
    leave_during_startup()
    value = os.environ.get(MASTER_ENV, "")
    if value.isdigit():
        die_with_parent(int(value))
        watch_parent(int(value), LISTENER_DRAIN)
