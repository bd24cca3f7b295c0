"""How a server process of ours ends: with its parent, and within a bound.

Used by the daemon's children (``entrypoints/daemon/``) and the reference registry, for any
server made by Granian's multi-process ``Server`` (ASGI or RSGI alike: the worker side runs
in the app factory, before Granian installs the worker's own signal handlers).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Any

log = logging.getLogger("imeisync.lifecycle")

DRAIN = 20.0  # seconds a server gives requests in flight once asked to stop
MASTER_ENV = "IMEISYNC_GRANIAN_MASTER_PID"  # a Granian master's pid, for its forked workers
PARENT_CHECK = 0.5  # seconds between two looks at whether the parent is still there
PR_SET_PDEATHSIG = 1


def die_with_parent(expected: int) -> None:
    """Ask the kernel for SIGTERM when this process's parent dies, however it dies (Linux);
    exit at once if it already has (``expected``: the parent's pid). The kernel's signal is
    per thread, cleared by fork and lost if the parent died before the request;
    ``watch_parent`` is the other half."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != expected:
        os._exit(0)  # the parent died before the request took effect


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
    master = os.getpid()

    def on_interrupt(*args: Any, **kwargs: Any) -> None:
        if os.getpid() != master:
            # A worker forked a moment ago runs its master's handler until Granian installs
            # its own, after the app factory: a stop now must not be lost. Nothing to drain.
            os._exit(0)
        stopping.set()
        interrupt(*args, **kwargs)

    def guard() -> None:
        stopping.wait()
        time.sleep(drain)
        for worker in list(getattr(server, "wrks", [])):
            if worker.is_alive():
                log.error("worker %s did not stop within %ss; killing it",
                          worker.inner.pid, drain)
                with contextlib.suppress(OSError):
                    os.kill(worker.inner.pid, signal.SIGKILL)
        time.sleep(5.0)
        os._exit(1)  # still here: Granian's shutdown itself is stuck

    server.signal_handler_interrupt = on_interrupt  # read by Granian when it installs handlers
    threading.Thread(target=guard, name="shutdown-bound", daemon=True).start()


def leave_during_startup() -> None:
    """In a freshly forked Granian worker: exit at once on SIGTERM/SIGINT until Granian installs
    the worker's own handlers (after the app factory returns). The master's handler, inherited
    until then, does the same once ``bound_granian_shutdown`` has wrapped it; this covers a
    worker whose master is not wrapped.

    A forked worker inherits its master's Python handler, which only sets a flag on the
    master's (copied) server object: a SIGTERM that reaches a worker while it loads its index
    would be lost, the worker would go on serving, and its master would wait for it forever.
    Nothing has been served yet, so there is nothing to drain.
    """

    def leave(_signum: int, _frame: Any) -> None:
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, leave)


def mark_granian_master() -> None:
    """In a Granian master before ``serve()``: name it to the workers it will fork."""
    os.environ[MASTER_ENV] = str(os.getpid())


def granian_worker_startup(drain: float) -> None:
    """First thing in a Granian worker's app factory: leave on a stop signal until Granian takes
    over, and stop when the master is gone (its workers have no parent-death signal: fork
    clears it), ending outright ``drain`` seconds later."""
    leave_during_startup()
    value = os.environ.get(MASTER_ENV, "")
    if value.isdigit():
        die_with_parent(int(value))
        watch_parent(int(value), drain)
