"""The supervisor's children: processes it starts, watches, restarts and stops.

``Child`` is what every kind has in common (uvicorn's ``supervisors.multiprocess.Process`` is the
model): ``start()``, ``alive()``, ``ping()``, ``terminate()``, ``wait()`` (join with a bound, then
SIGKILL of the child's whole process group), ``reap()`` and the crash bookkeeping the supervisor's
restart back-off reads. A kind only says how it is started (``command()``), where it serves
(``listen``) and how it is asked whether it answers (``ping()``). Each child runs in its own
session, so its process group is its own: Granian's workers die with their master when the group
is killed. A new kind: a ``Child`` subclass, a role in ``__main__`` whose main calls
``die_with_parent``/``watch_parent`` first, and ``Daemon._start`` appending it to ``children``
(start, probes, replacement, back-off, shutdown and the run-folder record then apply).

The child side: ``die_with_parent()`` and ``watch_parent()`` (``adapters/lifecycle.py``) at the top
of every child's ``main``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from imeisync.adapters.lifecycle import (
    DRAIN,
    bound_granian_shutdown,
    die_with_parent,
    granian_worker_startup,
    mark_granian_master,
    watch_parent,
)
from imeisync.config import Config, load_config
from imeisync.entrypoints import logs
from imeisync.entrypoints.daemon.ports import probe
from imeisync.entrypoints.daemon.records import RunFolder
from imeisync.entrypoints.telemetry import RUN_DIR_ENV, Board

log = logging.getLogger("imeisync.daemon")

LISTENER_DRAIN = DRAIN  # seconds for in-flight requests at shutdown (both listeners)

CRASHES = 5  # deaths of one child within CRASH_WINDOW before the supervisor gives up
CRASH_WINDOW = 300.0
SUPERVISOR_ENV = "IMEISYNC_SUPERVISOR_PID"
# The service manager's variables are for the supervisor alone.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


# -- the child side ------------------------------------------------------------------------------


def supervisor_pid() -> int | None:
    value = os.environ.get(SUPERVISOR_ENV, "")
    return int(value) if value.isdigit() else None


# -- the supervisor side -------------------------------------------------------------------------


class Child:
    """One supervised process (and whatever it forks): started, watched, restarted, stopped."""

    kind = "child"  # names it in logs
    slug = "child"  # names its record in the run folder
    stop_first = False  # SIGTERM before the others at shutdown

    def __init__(self, config: Config, board: Board, runs: RunFolder | None = None):
        self.config = config
        self.board = board
        self.runs = runs
        self.proc: subprocess.Popen[bytes] | None = None
        self.deaths: deque[float] = deque()
        self.restart_at: float | None = None
        self.answered_at: float | None = None  # last answer to ping() since this start

    @property
    def listen(self) -> str:
        """Where it serves (for messages)."""
        raise NotImplementedError

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

    def answering(self, within: float) -> bool:
        """It answered a ping in the last ``within`` seconds."""
        answered = self.answered_at
        return answered is not None and time.monotonic() - answered <= within

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

    @property
    def listen(self) -> str:
        return self.config.eir.listen.text

    def command(self) -> list[str]:
        return [sys.executable, "-m", "imeisync.entrypoints.daemon", "eir", *self.config_args()]

    def describe(self) -> str:
        return (f" on {self.config.eir.listen} with "
                f"{self.config.eir.workers or os.cpu_count()} worker(s)")

    def ping(self, timeout: float = 2.0) -> bool:
        return probe(self.listen, tls=self.config.eir.tls,
                     timeout=timeout) is not None


def eir_child_main(config_path: str | None) -> None:
    """``python -m imeisync.entrypoints.daemon eir [--config PATH]``: the attach-check server
    as the daemon runs it. Not meant to be started by hand (use ``imeisync run``)."""
    from imeisync.entrypoints import eir

    supervisor = supervisor_pid()
    if supervisor is not None:
        die_with_parent(supervisor)
        watch_parent(supervisor, LISTENER_DRAIN + 5)
    config = load_config(config_path)
    fmt, level = config.log.format, config.log.level
    logs.configure(fmt, level)
    eir._prepare_store(config)
    mark_granian_master()
    srv = eir.server(config, target="imeisync.entrypoints.daemon.eir_worker:eir_worker_app",
                     respawn_failed_workers=True,
                     log_dictconfig=logs.granian_log_config(fmt, level))
    bound_granian_shutdown(srv, LISTENER_DRAIN)
    srv.serve()


def worker_startup() -> None:
    """First thing in each attach-check worker (see ``granian_worker_startup``)."""
    granian_worker_startup(LISTENER_DRAIN)
