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
worker) and replaces it if it stops answering. The police API carries
little traffic, so it runs in the supervisor (Granian's embedded server), where SIGHUP can
reload police keys and tokens in place, without restarting anything or dropping a request.

A crash leaves nothing behind that could keep the next start from binding: each child (and
each Granian worker) stops when its parent dies — a parent-death signal and a liveness check,
as the signal is per thread and can race the start-up (``adapters/lifecycle.py``) — and the run
folder records every child by pid and start time, so the next ``imeisync run`` of the same
configuration stops what is still running before it binds (``records``).

Signals:

* SIGTERM / SIGINT — the S13 listener first (DPR to every peer), stop accepting on both
  listeners, let in-flight requests finish (Granian's graceful shutdown, at most 20 s; a worker
  still busy then is killed by its master), wait up to 10 s for running jobs, make one last push
  attempt (leader only; no retries, short timeouts), release the leadership, exit 0.
* SIGHUP — re-read the trusted police keys and the API tokens (``App.reload()``); on error the
  old sets stay in force and the error is logged.

Readiness: ``READY=1`` once every attach-check worker has its index loaded, both listeners
answer ``/healthz`` and, with ``[s13] listen`` set, the S13 listener answers from a loaded index.
``WATCHDOG=1`` every half ``WatchdogSec`` while the supervisor's loop runs, every child and the
API listener answer (any HTTP status: a database outage is not a reason to be killed), the
election thread is alive and no job is hung.

Modules (uvicorn's ``supervisors/`` is the model): ``supervisor`` (start, signals, watchdog,
readiness, shutdown), ``children`` (a supervised process; the attach-check server is one kind),
``s13_child`` (the S13 listener as another kind, its health and metrics), ``eir_worker`` (the
app each attach-check worker serves), ``api_listener`` (the embedded police API listener),
``health`` (``/healthz``, ``/metrics``, the telemetry thread), ``ports`` (listen addresses,
free-port checks, probes), ``records`` (the run folder's child records).
``python -m imeisync.entrypoints.daemon eir`` starts the attach-check child,
``python -m imeisync.entrypoints.s13`` the S13 one.
"""
