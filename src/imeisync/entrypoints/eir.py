"""The attach check: TS 29.511 N5g-eir_EquipmentIdentityCheck, answered from memory.

``GET /n5g-eir-eic/v1/equipment-status?pei=…[&supi=imsi-…][&gpsi=…][&supported-features=…]``

* ``200 application/json {"status": "WHITELISTED" | "BLACKLISTED" | "GREYLISTED"}``;
* an unknown device answers per ``[eir] unknown_status``: ``WHITELISTED``, or ``NOT_FOUND`` →
  ``404 application/problem+json`` with ``cause: ERROR_EQUIPMENT_UNKNOWN``;
* ``pei`` missing → 400 ``MANDATORY_IE_MISSING``; malformed → 400 ``INVALID_QUERY_PARAM``, both
  with ``invalidParams: [{"param": "query pei", "reason": …}]``; a malformed ``supi`` likewise;
* any other method → 405 (``Allow: GET``); a fault → 500 ``SYSTEM_FAILURE``, never a traceback;
* the index not built yet (database unreachable at first start, no persisted file) → 503.

Also ``GET /healthz`` (200 while attach checks can be answered; JSON: index size, change
sequence, staleness, database reachability) and ``GET /metrics`` (Prometheus).

The hot path is a bare ASGI callable: bodies and header lists are encoded once at start,
the query string is split by hand (``urllib`` only when it is percent-encoded), the verdict
is one ``AttachIndex.lookup`` — no framework, no logging, no database, no allocation beyond
what parsing the ``pei`` needs. Granian serves it: HTTP/1.1 and HTTP/2 with prior knowledge
(h2c) on one port, TLS with ALPN when ``[eir] tls_cert``/``tls_key`` are set, ``[eir] workers``
processes, each loading (or building) its own index and following ``change_log`` itself.

Run: ``python -m imeisync.entrypoints.eir --config PATH``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from imeisync.config import parse_listen
from imeisync.domain.errors import BadInput
from imeisync.domain.imei import key_of_network, key_to_int
from imeisync.domain.verdict import Status, network_answer
from imeisync.entrypoints.asgi import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:  # imported where it is built (app_from_config): workers import this module
    from imeisync.adapters.attach_index import IndexKeeper

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
        # not-ready signal create_app's decide() turns into 503.
        return self.keeper.index.lookup(key, imsi)  # type: ignore[union-attr]

    def health(self) -> dict[str, Any]:
        return self.keeper.health()

    @property
    def ready(self) -> bool:
        return self.keeper.index is not None

    def stop(self) -> None:
        self.keeper.stop()


# -- pre-encoded responses -----------------------------------------------------------------

JSON = b"application/json"
PROBLEM = b"application/problem+json"

Response = tuple[dict[str, Any], dict[str, Any]]


def _response(status: int, body: bytes, content_type: bytes = JSON,
              extra: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


_TITLES = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error", 503: "Service Unavailable"}


def problem(status: int, cause: str, detail: str,
            invalid: list[dict[str, str]] | None = None,
            extra: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    """A TS 29.500 ProblemDetails response."""
    body: dict[str, Any] = {
        "type": f"https://imeisync.invalid/problems/{cause.lower().replace('_', '-')}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "cause": cause,
    }
    if invalid:
        body["invalidParams"] = invalid
    return _response(status, json.dumps(body, ensure_ascii=False).encode(), PROBLEM, extra)


def _status_body(status: str) -> bytes:
    return json.dumps({"status": status}, separators=(",", ":")).encode()


R_NOT_FOUND = problem(404, "ERROR_EQUIPMENT_UNKNOWN",
                      "the equipment identified by pei is not known to this EIR")
R_PEI_MISSING = problem(400, "MANDATORY_IE_MISSING", "the query parameter pei is required",
                        [{"param": "query pei", "reason": "missing"}])
R_METHOD = problem(405, "METHOD_NOT_ALLOWED", "equipment-status only supports GET",
                   extra=((b"allow", b"GET"),))
R_FAULT = problem(500, "SYSTEM_FAILURE", "the EIR failed to answer; the fault has been logged")
R_NOT_READY = problem(503, "NF_CONGESTION",
                      "the EIR is starting and has no blocklist in memory yet; retry shortly",
                      extra=((b"retry-after", b"1"),))
R_NO_ROUTE = problem(404, "RESOURCE_URI_STRUCTURE_NOT_FOUND", "no such resource")


def _invalid(param: str, reason: str) -> Response:
    return problem(400, "INVALID_QUERY_PARAM", f"query parameter {param} is invalid: {reason}",
                   [{"param": f"query {param}", "reason": reason}])


# -- metrics -------------------------------------------------------------------------------

# Outcome labels, by index into the counters.
OUTCOMES = ("WHITELISTED", "BLACKLISTED", "GREYLISTED", "NOT_FOUND", "bad_request",
            "method_not_allowed", "error", "not_ready")
_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3)


class Metrics(Collector):
    """Plain integer counters on the hot path, turned into Prometheus families when scraped.

    ``prometheus_client``'s own Counter/Histogram take a lock per call; this costs an index
    increment and one ``bisect``. Figures are per worker process (label ``worker``).
    """

    def __init__(self, lookup: Lookup):
        self.lookup = lookup
        self.counts = [0] * len(OUTCOMES)
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.worker = str(os.getpid())

    def observe(self, outcome: int, seconds: float) -> None:
        self.counts[outcome] += 1
        self.buckets[bisect_left(_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def collect(self) -> Iterator[Any]:
        labels = ["worker"]
        checks = CounterMetricFamily(
            "imeisync_attach_checks", "Attach checks answered, by outcome",
            labels=[*labels, "outcome"])
        for name, value in zip(OUTCOMES, self.counts, strict=True):
            checks.add_metric([self.worker, name], value)
        yield checks
        latency = HistogramMetricFamily(
            "imeisync_attach_check_seconds",
            "Time to answer an attach check inside the application", labels=labels)
        cumulative, acc = [], 0
        for bound, value in zip((*_BUCKETS, float("inf")), self.buckets, strict=True):
            acc += value
            cumulative.append((repr(bound) if bound != float("inf") else "+Inf", acc))
        latency.add_metric([self.worker], cumulative, self.latency_sum)
        yield latency
        health = self.lookup.health()
        for name, doc, value in (
            ("imeisync_attach_index_entries", "Devices with an open record in the index",
             health.get("entries", 0)),
            ("imeisync_attach_index_blocked", "Blocked keys in the index",
             health.get("blocked", 0)),
            ("imeisync_attach_index_tracked", "Tracked keys in the index",
             health.get("tracked", 0)),
            ("imeisync_attach_index_seq", "Change sequence the index reflects",
             health.get("seq") or 0),
            ("imeisync_attach_index_staleness_seconds",
             "Seconds since the index last caught up with the store",
             health.get("staleness_seconds", 0)),
            ("imeisync_attach_index_database_reachable",
             "1 if the last poll of the store succeeded", int(bool(health.get(
                 "database_reachable")))),
            ("imeisync_attach_violations",
             "BLACKLISTED answers for devices whose every record was closed over a minute "
             "earlier (should stay 0)", health.get("violations", 0)),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric([self.worker], float(value))
            yield gauge


# -- the application -----------------------------------------------------------------------


def create_app(
    lookup: Lookup,
    *,
    unknown_status: str = "WHITELISTED",
    extra_health: Callable[[], dict[str, Any]] | None = None,
    metrics: Metrics | None = None,
    render_metrics: Callable[[], bytes] | None = None,
) -> ASGIApp:
    """The ASGI application answering from ``lookup``.

    ``metrics``/``render_metrics``: the daemon passes the worker's collector and a renderer
    that adds every other worker's figures and its own, so any worker's ``/metrics`` is whole.
    """
    by_status: dict[Status, tuple[Response, int]] = {}
    for status in Status:
        shown = network_answer(status, unknown_status)
        response = R_NOT_FOUND if shown == "NOT_FOUND" else _response(200, _status_body(shown))
        by_status[status] = (response, OUTCOMES.index(shown))
    metrics = metrics if metrics is not None else Metrics(lookup)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    observe = metrics.observe
    clock = time.perf_counter
    lookup_fn = lookup.lookup
    bad_request = OUTCOMES.index("bad_request")
    fault = OUTCOMES.index("error")
    not_allowed = OUTCOMES.index("method_not_allowed")
    not_ready = OUTCOMES.index("not_ready")
    last_fault = [0.0]

    def answer(query: bytes) -> tuple[Response, int]:
        if b"%" in query or b"+" in query:
            return answer_encoded(query)
        pei = supi = None
        for part in query.split(b"&"):
            name, _, value = part.partition(b"=")
            if name == b"pei":
                if pei is not None:
                    return _invalid("pei", "given more than once"), bad_request
                pei = value
            elif name == b"supi":
                supi = value
        return decide(pei, supi)

    def answer_encoded(query: bytes) -> tuple[Response, int]:
        """The rare percent-encoded query: decode it properly, then decide."""
        try:
            pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return _invalid("pei", "the query string is not valid percent-encoded ASCII"), \
                bad_request
        found: dict[str, list[str]] = {"pei": [], "supi": []}
        for name, value in pairs:
            if name in found:
                found[name].append(value)
        if len(found["pei"]) > 1:
            return _invalid("pei", "given more than once"), bad_request
        values = []
        for name in ("pei", "supi"):
            first = found[name][0] if found[name] else None
            if first is not None and not first.isascii():
                return _invalid(name, "not an identity of ASCII letters, digits and '-'"), \
                    bad_request
            values.append(first.encode("ascii") if first is not None else None)
        return decide(values[0], values[1])

    def decide(pei: bytes | None, supi: bytes | None) -> tuple[Response, int]:
        if pei is None:
            return R_PEI_MISSING, bad_request
        try:
            key = key_to_int(key_of_network(pei.decode("ascii")))
        except (BadInput, UnicodeDecodeError) as exc:
            return _invalid("pei", _reason(exc)), bad_request
        imsi = None
        if supi is not None and supi.startswith(b"imsi-"):
            digits = supi[5:]
            if not (5 <= len(digits) <= 15 and digits.isdigit()):
                return _invalid("supi", "imsi- must be followed by 5 to 15 digits"), bad_request
            imsi = digits.decode("ascii")
        try:
            return by_status[lookup_fn(key, imsi)]
        except AttributeError:  # no index yet (KeeperLookup: keeper.index is None)
            if not lookup.ready:
                return R_NOT_READY, not_ready
            raise

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send, lookup)
            return
        path = scope["path"]
        if path == EIC_PATH:
            started = clock()
            if scope["method"] == "GET":
                try:
                    (start, body), outcome = answer(scope["query_string"])
                except Exception:
                    (start, body), outcome = R_FAULT, fault
                    now = time.monotonic()
                    if now - last_fault[0] > 10:  # at most one traceback per 10 s
                        last_fault[0] = now
                        log.exception("attach check failed")
            else:
                (start, body), outcome = R_METHOD, not_allowed
            await send(start)
            await send(body)
            observe(outcome, clock() - started)
            return
        if path == "/healthz":
            start, body = _healthz(lookup, extra_health)
        elif path == "/metrics":
            data = render_metrics() if render_metrics is not None else generate_latest(registry)
            start, body = _response(200, data, b"text/plain; version=0.0.4; charset=utf-8")
        else:
            start, body = R_NO_ROUTE
        if scope["method"] not in ("GET", "HEAD"):
            start, body = problem(405, "METHOD_NOT_ALLOWED", f"{path} only supports GET",
                                  extra=((b"allow", b"GET"),))
        await send(start)
        await send(body)

    return app


def _reason(exc: Exception) -> str:
    if isinstance(exc, BadInput):
        return exc.message
    return "not ASCII"


def _healthz(lookup: Lookup, extra: Callable[[], dict[str, Any]] | None) -> Response:
    health = lookup.health()
    if not health.get("ready"):
        state = "starting"
    elif health.get("database_reachable"):
        state = "ok"
    else:
        state = "stale"
    body = {"status": state, "attach_index": health, "database": {
        "reachable": bool(health.get("database_reachable")),
        "last_error": health.get("last_error"),
    }}
    if extra is not None:
        body.update(extra())
    code = 200 if health.get("ready") else 503
    return _response(code, json.dumps(body, indent=1).encode())


async def _lifespan(receive: Receive, send: Send, lookup: Lookup) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                lookup.stop()
            except Exception:
                log.exception("attach index: stopping failed")
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- composition ---------------------------------------------------------------------------


def app_from_config(config: Any) -> ASGIApp:
    """Load or build the index for ``config`` and return the app (one per worker process)."""
    from imeisync.bootstrap import index_keeper

    keeper = index_keeper(config).start()
    return create_app(KeeperLookup(keeper),
                      unknown_status=config.get("eir", "unknown_status"))


def app_from_environment() -> ASGIApp:
    """Granian's factory in each worker: the config named by ``IMEISYNC_CONFIG``."""
    from imeisync.config import load_config

    config = load_config()
    _configure_logging(config)
    return app_from_config(config)


def _configure_logging(config: Any) -> None:
    """The daemon's one-line log format ([log] format, level; IMEIs masked below WARNING)."""
    from imeisync.entrypoints.logs import configure

    configure(config.get("log", "format"), config.get("log", "level"))


def server(config: Any, *, workers: int | None = None, listen: str | None = None,
           target: str = "imeisync.entrypoints.eir:app_from_environment",
           **granian_options: Any) -> Any:
    """A Granian server for the attach check (``.serve()`` blocks until stopped).

    ``granian_options`` override the tuned defaults (benchmarks try alternatives).
    """
    from pathlib import Path

    from granian.constants import HTTPModes, Interfaces
    from granian.server import Server

    host, port = parse_listen(listen or config.get("eir", "listen"), "--listen")
    count = workers if workers is not None else config.get("eir", "workers")
    count = count or os.cpu_count() or 1
    cert, key = config.get("eir", "tls_cert"), config.get("eir", "tls_key")
    if bool(cert) != bool(key):
        raise BadInput("[eir] tls_cert and tls_key must be set together (or neither)")
    for name, value in (("tls_cert", cert), ("tls_key", key)):
        if value and not Path(value).is_file():
            raise BadInput(f"[eir] {name} {value} does not exist",
                           "point it at a PEM file, or leave both TLS keys empty for h2c")
    if config.source and Path(config.source).is_file():
        os.environ["IMEISYNC_CONFIG"] = str(Path(config.source).resolve())
    options: dict[str, Any] = {
        "interface": Interfaces.ASGI, "factory": True, "workers": count,
        "http": HTTPModes.auto, "websockets": False, "log_access": False, "backlog": 2048,
    }
    if cert:
        options.update(ssl_cert=Path(cert), ssl_key=Path(key))
    options.update(granian_options)
    return Server(target, address=host, port=int(port), **options)


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
    index_file = config.get("eir", "index_file")
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
