"""The S13 attach check as a process: ``python -m imeisync.entrypoints.s13 [--config PATH]``.

One asyncio process (uvloop when installed) with its own attach index following
``change_log`` like each N5g-eir worker (``IndexKeeper``), serving ``[s13] listen`` over TCP or
SCTP. MMEs hold a few long-lived Diameter connections, so one process answers them all; spreading
them over processes would balance connections, not load.

``imeisync run`` starts it as a supervised child (``[s13] listen`` set); it can also run alone.
The listener opens before the index is loaded: ECRs meanwhile get 3004 DIAMETER_TOO_BUSY, so
an MME asks its other EIR rather than timing out.

* SIGTERM/SIGINT: stop listening, DPR to every peer, wait for their DPAs (bounded), exit 0.
* It dies with its supervisor like every child of the daemon: ``die_with_parent`` and
  ``watch_parent`` (``adapters/lifecycle.py``) — a parent-death signal and a liveness check.
* Sightings: a GREYLISTED answer (BLACKLISTED with ``[sightings] blocked_attempts``) queues the
  ECR's bytes for the process's sighting writer (``services/sighting_writer``), stopped last.
* Figures: once a second to ``s13-<pid>.json`` in the daemon's run folder (counters, peers by
  host, index health); the supervisor shows them in ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from imeisync.adapters.diameter.s13 import OUTCOMES, RESULT_OF, S13App
from imeisync.adapters.lifecycle import DRAIN, die_with_parent, watch_parent
from imeisync.adapters.sighting_queue import SightingFigures
from imeisync.config import Config
from imeisync.config_values import parse_listen
from imeisync.domain.errors import BadInput
from imeisync.entrypoints.daemon.children import supervisor_pid
from imeisync.entrypoints.eir_metrics import BUCKETS, latency_histogram
from imeisync.entrypoints.s13_server import Node, Settings
from imeisync.entrypoints.telemetry import RUN_DIR_ENV

log = logging.getLogger("imeisync.s13")

SNAPSHOT_PREFIX = "s13-"
COMMANDS = {257: "CER", 280: "DWR", 282: "DPR", 324: "ECR"}
# S13 outcomes under the names the N5g-eir counters use (one metric, label interface).
_SHARED_OUTCOME = {"WHITELISTED": "WHITELISTED", "BLACKLISTED": "BLACKLISTED",
                   "GREYLISTED": "GREYLISTED", "NOT_FOUND": "NOT_FOUND", "too_busy": "not_ready",
                   "error": "error", "congested": "congested"}


# -- configuration ---------------------------------------------------------------------------


def sctp_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except (OSError, AttributeError):
        return False
    return True


def settings_from(config: Config) -> Settings:
    """``[s13]`` as server settings; ``BadInput`` for what cannot work."""
    peers = config.s13.peers
    if not peers:
        raise BadInput("[s13] peers is empty: no MME could connect",
                       'list the Origin-Host of each MME/SGSN, or ["*"] to allow any')
    watchdog = config.s13.watchdog
    return Settings(
        origin_host=config.s13.origin_host,
        origin_realm=config.s13.origin_realm,
        peers=None if peers == ("*",) else frozenset(peers),
        watchdog=watchdog,
        stall_timeout=min(10.0, watchdog),
        max_inflight=config.eir.max_inflight,
        per_client_share=config.eir.per_client_share,
    )


def check_transport(config: Config) -> None:
    if config.s13.transport == "sctp" and not sctp_available():
        raise BadInput("[s13] transport = \"sctp\" but this kernel has no SCTP "
                       "(socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails)",
                       "load the sctp kernel module (modprobe sctp), or use transport = \"tcp\"")


# -- figures ---------------------------------------------------------------------------------


def snapshot(node: Node, health: dict[str, Any], listen: str,
             sightings: SightingFigures | None = None) -> dict[str, Any]:
    return {
        "sightings": sightings.snapshot() if sightings is not None else {},
        "pid": os.getpid(), "at": time.time(), "listen": listen,
        "ready": bool(health.get("ready")), "health": health,
        "counts": list(node.app.counts), "buckets": list(node.buckets),
        "latency_sum": node.latency_sum, "peers": node.peers_by_host(),
        "connections": len(node.connections),
        "answers": [[cmd, code, n] for (cmd, code), n in node.answers.items()],
        "refused": dict(node.refused), "closed": dict(node.closed),
    }


class S13Figures(Collector):
    """Prometheus families from a snapshot (the child's, live or as written to the board)."""

    def __init__(self, snap: dict[str, Any]):
        self.snap = snap

    def collect(self) -> Iterator[Any]:
        yield from self.shared()
        yield from self.own()

    def shared(self) -> Iterator[Any]:
        """The families the N5g-eir workers also export, labelled ``interface="s13"``."""
        snap, worker = self.snap, str(self.snap.get("pid", ""))
        counts = snap.get("counts") or [0] * len(OUTCOMES)
        by_name: dict[str, int] = {}
        for outcome, value in zip(OUTCOMES, counts, strict=False):
            shared = _SHARED_OUTCOME.get(outcome, "bad_request")
            by_name[shared] = by_name.get(shared, 0) + int(value)
        checks = CounterMetricFamily("imeisync_attach_checks", "Attach checks answered, by outcome",
                                     labels=["worker", "interface", "outcome"])
        for name, value in by_name.items():
            checks.add_metric([worker, "s13", name], value)
        yield checks
        buckets = snap.get("buckets") or [0] * (len(BUCKETS) + 1)
        yield latency_histogram([worker, "s13"], buckets, float(snap.get("latency_sum") or 0))
        if snap.get("sightings"):
            yield from SightingFigures.from_snapshot(worker, "s13", snap["sightings"]).collect()

    def own(self) -> Iterator[Any]:
        snap = self.snap
        peers = GaugeMetricFamily("imeisync_s13_peers",
                                  "Open S13 (Diameter) connections, by peer Origin-Host",
                                  labels=["host"])
        for host, count in sorted((snap.get("peers") or {}).items()):
            peers.add_metric([host], float(count))
        yield peers
        answers = CounterMetricFamily("imeisync_s13_answers",
                                      "Diameter answers sent, by command and result code",
                                      labels=["command", "result_code"])
        totals: dict[tuple[str, str], int] = {}
        for cmd, code, n in snap.get("answers") or []:
            key = (COMMANDS.get(int(cmd), str(cmd)), str(code))
            totals[key] = totals.get(key, 0) + int(n)
        for outcome, value in zip(OUTCOMES, snap.get("counts") or [], strict=False):
            key = ("ECR", str(RESULT_OF[OUTCOMES.index(outcome)]))
            totals[key] = totals.get(key, 0) + int(value)
        for (cmd, code), value in sorted(totals.items()):
            answers.add_metric([cmd, code], value)
        yield answers
        for name, doc, field in (
            ("imeisync_s13_peers_refused", "S13 connections refused, by reason", "refused"),
            ("imeisync_s13_connections_closed", "S13 connections closed, by reason", "closed"),
        ):
            family = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, value in sorted((snap.get(field) or {}).items()):
                family.add_metric([reason], int(value))
            yield family


def read_snapshots(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The live S13 process's figures on the board (at most one in practice)."""
    found = []
    for path in Path(folder).glob(f"{SNAPSHOT_PREFIX}*.json"):
        try:
            snap = json.loads(path.read_bytes())
            pid = int(snap["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        except PermissionError:
            pass
        snap["age"] = time.time() - float(snap.get("at", 0))
        found.append(snap)
    return sorted(found, key=lambda s: s["age"])


def _write_snapshot(folder: Path, snap: dict[str, Any]) -> None:
    path = folder / f"{SNAPSHOT_PREFIX}{snap['pid']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(json.dumps(snap, default=str).encode())
    os.replace(tmp, path)


# -- the process -----------------------------------------------------------------------------


async def serve(config: Config, listen: str, *, board: Path | None = None) -> int:
    """Listen, answer, and drain on SIGTERM; the exit status."""
    from imeisync.bootstrap import index_keeper
    from imeisync.entrypoints.eir import KeeperLookup
    from imeisync.services.sighting_writer import capture, in_index_ranges

    settings = settings_from(config)
    if settings.peers is None:
        log.warning("s13: [s13] peers = [\"*\"]: any Diameter peer may connect and query")
    keeper = index_keeper(config)  # the same index, [eir] unknown_tac included, as N5g-eir
    lookup = KeeperLookup(keeper)
    sightings = capture(config, "s13", str(os.getpid()), in_range=in_index_ranges(keeper))
    app = S13App(lookup.lookup, lambda: lookup.ready, origin_host=settings.origin_host,
                 origin_realm=settings.origin_realm,
                 unknown_status=config.eir.unknown_status, sightings=sightings.queue.hook)
    node = Node(app, settings)
    host, port = parse_listen(listen, "[s13] listen")
    transport = config.s13.transport
    try:
        port = await node.listen(host, port, transport)
    except OSError as exc:
        raise BadInput(f"[s13] listen {listen}: {exc.strerror}",
                       "another process listens there, or the address is not this machine's"
                       ) from None
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    log.info("s13: listening on %s (%s) as %s, realm %s; loading the attach index", where,
             transport, settings.origin_host, settings.origin_realm)
    print(f"s13 listening on {where}", file=sys.stderr, flush=True)

    def start_keeper() -> None:
        try:
            keeper.start()
            log.info("s13: attach index ready (%s entries)", keeper.health().get("entries"))
        except Exception:
            log.exception("s13: the attach index could not be started")

    threading.Thread(target=start_keeper, name="s13-index", daemon=True).start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = ["SIGTERM"]

    def on_signal(signum: int) -> None:
        reason[0] = signal.Signals(signum).name
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    while not stop.is_set():
        if board is not None:
            try:
                _write_snapshot(board, snapshot(node, keeper.health(), where,
                                                sightings.figures))
            except OSError as exc:
                log.warning("s13: could not write figures to %s: %s", board, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    started = time.monotonic()
    peers = len(node.peers_by_host())
    await node.drain()
    log.info("s13: stopped (%s) in %.1fs; sent DPR to %d peer(s)", reason[0],
             time.monotonic() - started, peers)
    if board is not None:
        with contextlib.suppress(OSError):
            (board / f"{SNAPSHOT_PREFIX}{os.getpid()}.json").unlink()
    keeper.stop(persist=False)  # the HTTP workers persist the file; one writer is enough
    sightings.stop()
    return 0


def run(config: Config, listen: str | None = None) -> int:
    check_transport(config)
    listen = listen or str(config.s13.listen or "")
    if not listen:
        raise BadInput("[s13] listen is empty: S13 is off", "set [s13] listen = \"IP:3868\"")
    settings_from(config)  # refuse a bad [s13] before anything starts
    folder = os.environ.get(RUN_DIR_ENV)
    coro = serve(config, listen, board=Path(folder) if folder else None)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from imeisync.config import load_config
    from imeisync.domain.errors import ImeisyncError
    from imeisync.entrypoints import logs

    parser = argparse.ArgumentParser(prog="python -m imeisync.entrypoints.s13",
                                     description="Serve the Diameter S13 attach check.")
    parser.add_argument("--config", metavar="PATH", default=None)
    parser.add_argument("--listen", default=None, help="IP:PORT (default: [s13] listen)")
    args = parser.parse_args(argv)
    supervisor = supervisor_pid()
    if supervisor is not None:  # started by ``imeisync run``: it ends with its supervisor
        die_with_parent(supervisor)
        watch_parent(supervisor, DRAIN + 5)  # SIGTERM (DPR to every peer), then the bound
    try:
        config = load_config(args.config)
        logs.configure(config.log.format, config.log.level)
        code = run(config, args.listen)
    except ImeisyncError as error:
        print(f"imeisync: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    sys.exit(code)


if __name__ == "__main__":
    main()
