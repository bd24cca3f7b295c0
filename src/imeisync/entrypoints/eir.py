"""The attach check: TS 29.511 N5g-eir_EquipmentIdentityCheck, answered from memory.

``GET /n5g-eir-eic/v1/equipment-status?pei=…[&supi=imsi-…][&gpsi=…][&supported-features=…]``

* ``200 application/json {"status": "WHITELISTED" | "BLACKLISTED" | "GREYLISTED"}``;
* an unknown device answers per ``[eir] unknown_status``: ``WHITELISTED``, or ``NOT_FOUND`` →
  ``404 application/problem+json`` with ``cause: ERROR_EQUIPMENT_UNKNOWN``;
* a bad query → 400 with the TS 29.500 cause of ``eir_answers.read_query``
  (``MANDATORY_QUERY_PARAM_MISSING``/``_INCORRECT`` for ``pei``, ``INVALID_QUERY_PARAM`` for a
  parameter the operation does not define, ``OPTIONAL_QUERY_PARAM_INCORRECT`` for a malformed
  ``supi``, ``gpsi`` or ``supported-features``), naming the parameters in ``invalidParams``;
* any other method → 405 (``Allow: GET``); a fault → 500 ``SYSTEM_FAILURE``, never a traceback;
* the index not built yet (database unreachable at first start, no persisted file) → 503.

An answer that may be a sighting (GREYLISTED; BLACKLISTED with ``[sightings] blocked_attempts``)
also hands its raw facts to the worker's sighting queue, O(1) and never waiting
(``adapters/sighting_queue``); the worker's writer thread records them (``services/sightings``).

Also ``GET /healthz`` (200 while attach checks can be answered; JSON: index size, change
sequence, staleness, database reachability, what serves the check) and ``GET /metrics``.

The app speaks Granian's RSGI interface (``EirApp``): per request the ``pei`` parse, one
``lookup`` and a response whose status, header list and body were built at start; the figures
are list-slot increments (``eir_metrics``). Granian serves it on uvloop with its Rust task
implementation where the interpreter allows (``granian_server.server_path``): HTTP/1.1 and h2c
on one port, TLS with ALPN when ``[eir] tls_cert``/``tls_key`` are set, ``[eir] workers``
processes, each loading (or building) its own index and following ``change_log`` itself.

Run: ``python -m imeisync.entrypoints.eir --config PATH``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest

from imeisync.config_values import parse_listen
from imeisync.domain.verdict import Status, network_answer
from imeisync.entrypoints.admission import Admission, client_host, granian_limits
from imeisync.entrypoints.eir_answers import (
    R_CONGESTED,
    R_FAULT,
    R_METHOD,
    R_NO_ROUTE,
    R_NOT_FOUND,
    R_NOT_READY,
    Answer,
    Refused,
    problem,
    read_query,
    response,
    status_answer,
)
from imeisync.entrypoints.eir_metrics import (
    BAD_REQUEST,
    BUCKETS,
    CONGESTED,
    ERROR,
    METHOD_NOT_ALLOWED,
    NOT_READY,
    OUTCOMES,
    Metrics,
)

__all__ = ["EIC_PATH", "EirApp", "KeeperLookup", "Lookup", "Metrics", "create_app", "server"]

if TYPE_CHECKING:  # imported where it is built (app_from_config): workers import this module
    from imeisync.adapters.attach_index import IndexKeeper
    from imeisync.adapters.sighting_queue import SightingQueue
    from imeisync.services.sighting_writer import SightingWriter

log = logging.getLogger(__name__)

EIC_PATH = "/n5g-eir-eic/v1/equipment-status"


class Lookup(Protocol):
    """What the app needs to answer: an index (``IndexKeeper``) or, in benchmarks, SQL."""

    def lookup(self, key: int, imsi: str | None) -> Status: ...

    def health(self) -> dict[str, Any]: ...

    @property
    def ready(self) -> bool: ...

    def stop(self) -> None: ...


class KeeperLookup:
    """``IndexKeeper`` as a ``Lookup``: one attribute read and one ``AttachIndex.lookup``."""

    def __init__(self, keeper: IndexKeeper):
        self.keeper = keeper

    def lookup(self, key: int, imsi: str | None) -> Status:
        # No None check: before the first load index is None and the AttributeError is the
        # not-ready signal the app turns into 503.
        return self.keeper.index.lookup(key, imsi)  # type: ignore[union-attr]

    def health(self) -> dict[str, Any]:
        return self.keeper.health()

    @property
    def ready(self) -> bool:
        return self.keeper.index is not None

    def stop(self) -> None:
        self.keeper.stop()


# -- the application -----------------------------------------------------------------------


class EirApp:
    """The RSGI application answering from ``lookup`` (Granian calls ``__rsgi__``).

    ``__rsgi__`` is a closure bound at creation, not a method: the hot path reads only its own
    cells. ``__rsgi_del__`` (the worker stopping) stops the index keeper, which persists the
    index; its follower thread is joined with a timeout, so shutdown stays bounded.
    """

    def __init__(self, lookup: Lookup, *, unknown_status: str = "WHITELISTED",
                 extra_health: Callable[[], dict[str, Any]] | None = None,
                 metrics: Metrics | None = None,
                 render_metrics: Callable[[], bytes] | None = None,
                 admission: Admission | None = None,
                 sightings: SightingWriter | None = None):
        self.lookup = lookup
        self.admission = admission if admission is not None else Admission()
        self.sightings = sightings
        self.metrics = metrics if metrics is not None else Metrics(lookup.health)
        self.extra_health = extra_health
        self.serving: dict[str, str] = {"interface": "rsgi"}
        self.last_fault = -60.0
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.metrics)
        self.render_metrics = render_metrics or (lambda: generate_latest(registry))
        self.__rsgi__ = self._handler(unknown_status)

    def _handler(self, unknown_status: str) -> Callable[[Any, Any], Any]:
        by_status: dict[Status, tuple[int, list[tuple[str, str]], bytes, int, Any]] = {}
        queue: SightingQueue | None = self.sightings.queue if self.sightings else None
        for status in Status:
            answer = network_answer(status, unknown_status)
            code, headers, body = R_NOT_FOUND if answer == "NOT_FOUND" else status_answer(answer)
            # The last item: the sighting hook of answers that may be sightings, else None.
            by_status[status] = (code, headers, body, OUTCOMES.index(answer),
                                 queue.hook(answer) if queue is not None else None)
        lookup_fn = self.lookup.lookup
        counts, buckets, latency = self.metrics.counts, self.metrics.buckets, self.metrics.latency
        clock = time.perf_counter
        other = self._other
        fault = self._fault
        gate, fast = self.admission.gate, self.admission.fast
        start_batch, admit_deep = self.admission.start_batch, self.admission.admit_deep

        async def handle(scope: Any, proto: Any) -> None:
            if scope.path == EIC_PATH and scope.method == "GET":
                started = clock()
                n = gate[0]  # admission (``admission``): checks admitted in this loop batch
                if n < fast:
                    if not n:
                        start_batch()
                    gate[0] = n + 1
                elif not admit_deep(client_host(scope.client)):
                    proto.response_bytes(*R_CONGESTED)
                    counts[CONGESTED] += 1
                    return
                try:
                    key, imsi = read_query(scope.query_string)
                    code, headers, body, outcome, sighted = by_status[lookup_fn(key, imsi)]
                    if sighted:  # an O(1) append, never blocks (adapters/sighting_queue)
                        sighted(key, imsi, scope.query_string, scope.client)
                except Refused as refused:
                    (code, headers, body), outcome = refused.answer, BAD_REQUEST
                except Exception:
                    (code, headers, body), outcome = fault()
                proto.response_bytes(code, headers, body)
                counts[outcome] += 1
                elapsed = clock() - started
                buckets[bisect_left(BUCKETS, elapsed)] += 1
                latency[0] += elapsed
                return
            code, headers, body = other(scope)
            proto.response_bytes(code, headers, body)

        return handle

    def _fault(self) -> tuple[Answer, int]:
        if not self.lookup.ready:  # no index yet (KeeperLookup: keeper.index is None)
            return R_NOT_READY, NOT_READY
        now = time.monotonic()
        if now - self.last_fault > 10:  # at most one traceback per 10 s
            self.last_fault = now
            log.exception("attach check failed")
        return R_FAULT, ERROR

    def _other(self, scope: Any) -> Answer:
        """Everything but a GET of equipment-status: off the hot path."""
        path, method = scope.path, scope.method
        if path == EIC_PATH:
            self.metrics.observe(METHOD_NOT_ALLOWED, 0.0)
            return R_METHOD
        if method not in ("GET", "HEAD"):
            return problem(405, "METHOD_NOT_ALLOWED", f"{path} only supports GET",
                           extra=(("allow", "GET"),))
        if path == "/healthz":
            return self._healthz()
        if path == "/metrics":
            return response(200, self.render_metrics(), "text/plain; version=0.0.4; charset=utf-8")
        return R_NO_ROUTE

    def _healthz(self) -> Answer:
        if "task_impl" not in self.serving and "loop" in self.serving:
            # Granian's Rust task implementation runs coroutines as its own Task subclass.
            task = asyncio.current_task()
            self.serving["task_impl"] = "rust" if type(task).__module__.startswith(
                "granian") else "asyncio"
        health = self.lookup.health()
        if not health.get("ready"):
            state = "starting"
        elif health.get("database_reachable"):
            state = "ok"
        else:
            state = "stale"
        body = {"status": state, "attach_index": health, "database": {
            "reachable": bool(health.get("database_reachable")),
            "last_error": health.get("last_error"),
        }, "server": self.serving}
        if self.extra_health is not None:
            body.update(self.extra_health())
        code = 200 if health.get("ready") else 503
        return response(code, json.dumps(body, indent=1).encode())

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        module = type(loop).__module__.split(".")[0]
        self.serving["loop"] = "uvloop" if module == "uvloop" else module
        log.info("attach check: Granian RSGI worker %d on %s", os.getpid(), self.serving["loop"])

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.lookup.stop()
        except Exception:
            log.exception("attach index: stopping failed")
        if self.sightings is not None:
            self.sightings.stop()


def create_app(
    lookup: Lookup,
    *,
    unknown_status: str = "WHITELISTED",
    extra_health: Callable[[], dict[str, Any]] | None = None,
    metrics: Metrics | None = None,
    render_metrics: Callable[[], bytes] | None = None,
    admission: Admission | None = None,
    sightings: SightingWriter | None = None,
) -> EirApp:
    """The RSGI application answering from ``lookup``.

    ``metrics``/``render_metrics``: the daemon passes the worker's collector and a renderer
    that adds every other worker's figures and its own, so any worker's ``/metrics`` is whole.
    """
    return EirApp(lookup, unknown_status=unknown_status, extra_health=extra_health,
                  metrics=metrics, render_metrics=render_metrics, admission=admission,
                  sightings=sightings)


# -- composition ---------------------------------------------------------------------------


def app_from_config(config: Any) -> EirApp:
    """Load or build the index for ``config`` and return the app (one per worker process).

    Inside ``imeisync run`` (the run-time board is in the environment) the worker also writes
    its figures to the board and serves every worker's and the daemon's on ``/metrics`` and
    ``/healthz`` (``telemetry``)."""
    from imeisync.bootstrap import index_keeper
    from imeisync.entrypoints.telemetry import Board
    from imeisync.services.sighting_writer import capture, in_index_ranges

    keeper = index_keeper(config).start()
    lookup = KeeperLookup(keeper)
    unknown_status = config.eir.unknown_status
    admission = Admission(config.eir.max_inflight, config.eir.per_client_share)
    sightings = capture(config, "n5g-eir", str(os.getpid()), in_range=in_index_ranges(keeper))
    board = Board.from_environment()
    if board is None:
        metrics = Metrics(lookup.health)
        metrics.sightings = sightings.figures
        return create_app(lookup, unknown_status=unknown_status, metrics=metrics,
                          admission=admission, sightings=sightings)
    return _daemon_worker_app(board, lookup, unknown_status, admission, sightings)


def _daemon_worker_app(board: Any, lookup: KeeperLookup, unknown_status: str,
                       admission: Admission, sightings: SightingWriter) -> EirApp:
    from imeisync.entrypoints.telemetry import (
        WORKER_STALE_AFTER,
        SnapshotWriter,
        worker_metrics_renderer,
    )

    metrics = Metrics(lookup.health)
    metrics.sightings = sightings.figures
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

    return create_app(lookup, unknown_status=unknown_status, extra_health=daemon_health,
                      metrics=metrics, render_metrics=worker_metrics_renderer(board, metrics),
                      admission=admission, sightings=sightings)


def app_from_environment() -> EirApp:
    """Granian's factory in each worker: the config named by ``IMEISYNC_CONFIG``."""
    from imeisync.config import load_config

    config = load_config()
    _configure_logging(config)
    return app_from_config(config)


def _configure_logging(config: Any) -> None:
    """The daemon's one-line log format ([log] format, level; IMEIs masked below WARNING)."""
    from imeisync.entrypoints.logs import configure

    configure(config.log.format, config.log.level)


def server(config: Any, *, workers: int | None = None, listen: str | None = None,
           target: str = "imeisync.entrypoints.eir:app_from_environment",
           **granian_options: Any) -> Any:
    """A Granian server for the attach check (``.serve()`` blocks until stopped).

    ``granian_options`` override the tuned defaults (benchmarks try alternatives).
    """
    from pathlib import Path

    from imeisync.entrypoints.granian_server import build, server_path

    host, port = parse_listen(listen, "--listen") if listen else config.eir.listen.address
    count = workers if workers is not None else config.eir.workers
    count = count or os.cpu_count() or 1
    tls = config.eir.tls_files()
    if config.source and Path(config.source).is_file():
        os.environ["IMEISYNC_CONFIG"] = str(Path(config.source).resolve())
    path = server_path()
    log.info("attach check on %s:%s: %s, %d worker(s)%s", host, port, path.describe(), count,
             ", TLS" if tls else "")
    return build(target, host, int(port), workers=count, tls=tls, fast=True,
                 **{**granian_limits(), **granian_options})


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from imeisync.config import load_config
    from imeisync.domain.errors import ImeisyncError

    parser = argparse.ArgumentParser(
        prog="python -m imeisync.entrypoints.eir",
        description="Serve the TS 29.511 attach check (N5g-eir equipment-status).")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="configuration file (default: $IMEISYNC_CONFIG, else "
                             "./config/imeisync.toml)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: [eir] workers; 0 = one per core)")
    parser.add_argument("--listen", default=None, help="HOST:PORT (default: [eir] listen)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        _configure_logging(config)
        srv = server(config, workers=args.workers, listen=args.listen)
    except ImeisyncError as error:
        print(f"imeisync: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    _prepare_store(config)
    srv.serve()


def _prepare_store(config: Any) -> None:
    """Create the schema of an empty database; an unreachable one is not fatal here: the
    workers serve the persisted index and keep trying (the attach check answers regardless)."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from imeisync.domain.errors import Unavailable
    from imeisync.store.db import Database
    from imeisync.store.schema import ensure_schema

    url = make_url(config.database_url)
    index_file = config.eir.index_file
    if (url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:"
            and not Path(url.database).exists() and index_file and Path(index_file).exists()):
        # A missing file with an index present is an outage (unmounted volume, moved file),
        # not a fresh install: creating an empty database would empty the blocklist.
        log.warning("attach check: database file %s is missing; not creating an empty one "
                    "while %s exists; serving the persisted index", url.database, index_file)
        return
    db = None
    try:
        db = Database(config.database_url)
        ensure_schema(db)
    except Unavailable as error:
        log.warning("attach check: %s; starting from the persisted index", error)
    finally:
        if db is not None:
            db.dispose()


if __name__ == "__main__":
    main()
