"""The daemon's run-time board: how its processes tell each other what they know.

``imeisync run`` is one supervisor process (scheduler, leader election, police API listener)
and the attach-check server's worker processes (Granian). Each worker keeps its attach-check
counters as plain integers (the hot path takes no lock, ``eir.Metrics``) and writes them, with
its index's health, to ``eir-<pid>.json`` in the run folder once a second. The supervisor writes
``daemon.json`` (sync freshness, leadership) and ``daemon.prom`` (its metrics) every few seconds.

So ``/metrics`` on either listener shows every worker — labelled ``worker`` — and the daemon's
figures; ``/healthz`` on either listener knows both whether attach checks can be answered and
how fresh the sync is. Why not ``prometheus_client``'s multiprocess mode: it needs its own
metric objects (a lock and an mmap write per attach check) and cannot carry the index's health;
a one-second snapshot costs the hot path nothing and a scrape at most a second of lag.

Files are written atomically (temporary file, rename). A worker that died stops being shown
once its pid is gone; the folder is emptied when the daemon starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imeisync.adapters.files import write_atomic
from imeisync.entrypoints.eir_metrics import Metrics
from imeisync.services.operations import OpsFigures

log = logging.getLogger(__name__)

RUN_DIR_ENV = "IMEISYNC_RUNTIME_DIR"
WORKER_PREFIX = "eir-"
WORKER_STALE_AFTER = 10.0  # seconds without a snapshot: the worker is hung or gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Board:
    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    @classmethod
    def from_environment(cls) -> Board | None:
        folder = os.environ.get(RUN_DIR_ENV)
        return cls(folder) if folder else None

    def reset(self) -> None:
        """Empty the folder (daemon start): nothing from a previous run is shown."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in self.folder.iterdir():
            if path.name.startswith((WORKER_PREFIX, "daemon.", ".")):
                with contextlib.suppress(OSError):
                    path.unlink()

    # -- attach-check workers ---------------------------------------------------------------

    def write_worker(self, metrics: Metrics, health: dict[str, Any]) -> None:
        pid = os.getpid()
        snapshot = {**metrics.snapshot(health), "pid": pid, "at": time.time()}
        write_atomic(self.folder / f"{WORKER_PREFIX}{pid}.json",
                     json.dumps(snapshot, default=str).encode(), durable=False)

    def workers(self, *, exclude: int | None = None) -> list[dict[str, Any]]:
        """Snapshots of the live workers (their process exists), freshest first."""
        found = []
        for path in self.folder.glob(f"{WORKER_PREFIX}*.json"):
            try:
                snapshot = json.loads(path.read_bytes())
                pid = int(snapshot["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if pid == exclude:
                continue
            if not _alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            snapshot["age"] = time.time() - float(snapshot.get("at", 0))
            found.append(snapshot)
        return sorted(found, key=lambda s: s["age"])

    # -- the supervisor ---------------------------------------------------------------------

    def write_daemon(self, summary: dict[str, Any], metrics_text: bytes) -> None:
        # Runtime files, rewritten every few seconds and gone at reboot: no fsync.
        write_atomic(self.folder / "daemon.prom", metrics_text, durable=False)
        write_atomic(self.folder / "daemon.json",
                     json.dumps({"at": time.time(), **summary}, default=str).encode(),
                     durable=False)

    def daemon(self) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = json.loads((self.folder / "daemon.json").read_bytes())
            return found
        except (OSError, ValueError):
            return None

    def daemon_metrics(self) -> bytes:
        try:
            return (self.folder / "daemon.prom").read_bytes()
        except OSError:
            return b""


# -- attach-check figures of every worker ------------------------------------------------------


def merge(collectors: Iterable[Collector]) -> list[Metric]:
    """One family per name, with the samples of every collector (they differ by label)."""
    families: dict[str, Metric] = {}
    for collector in collectors:
        for family in collector.collect():
            if family.name in families:
                families[family.name].samples.extend(family.samples)
            else:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                merged.samples = list(family.samples)
                families[family.name] = merged
    return list(families.values())


class _Families(Collector):
    def __init__(self, families: Callable[[], Iterable[Metric]]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families()


def render(families: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(lambda: families))
    return generate_latest(registry)


def worker_metrics_renderer(board: Board, own: Metrics) -> Callable[[], bytes]:
    """``/metrics`` of an attach-check worker: itself (live), the other workers (snapshots) and
    the daemon's figures."""
    pid = os.getpid()

    def render_all() -> bytes:
        others = [Metrics.from_snapshot(s) for s in board.workers(exclude=pid)]
        return render(merge([own, *others])) + board.daemon_metrics()

    return render_all


def eir_families(board: Board) -> list[Metric]:
    return merge(Metrics.from_snapshot(s) for s in board.workers())


class SnapshotWriter:
    """In each attach-check worker: write its figures to the board every ``interval``."""

    def __init__(self, board: Board, metrics: Metrics, health: Callable[[], dict[str, Any]],
                 interval: float = 1.0):
        self.board, self.metrics, self.health, self.interval = board, metrics, health, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eir-snapshot", daemon=True)

    def start(self) -> SnapshotWriter:
        self._write()
        self._thread.start()
        return self

    def _write(self) -> None:
        try:
            self.board.write_worker(self.metrics, self.health())
        except Exception as exc:  # a full disk must not stop attach checks
            log.warning("could not write the worker's figures to %s: %s", self.board.folder, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            (self.board.folder / f"{WORKER_PREFIX}{os.getpid()}.json").unlink()


# -- the daemon's own figures -------------------------------------------------------------------


def ops_families(figures: OpsFigures, jobs: dict[str, dict[str, Any]], leader: dict[str, Any],
                 workers: list[dict[str, Any]], expected_workers: int) -> list[Metric]:
    """Prometheus families for what the database says and what this daemon did."""
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None,
              ) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
        if value is not None:
            family.add_metric(list((labels or {}).values()), float(value))
        out.append(family)
        return family

    def labelled(family: GaugeMetricFamily | CounterMetricFamily,
                 counts: dict[Any, int]) -> None:
        """One sample per label tuple (the keys of ``counts``), in label order."""
        for values, count in sorted(counts.items()):
            family.add_metric(list(values), count)
        out.append(family)

    gauge("imeisync_database_reachable", "1 if the daemon's last read of the database worked",
          int(figures.database_reachable))
    labelled(GaugeMetricFamily("imeisync_outbox_changes",
                               "Outbox changes by state (pending: not sent yet; sent: no answer "
                               "yet; rejected: the registry refused them)", labels=["state"]),
             {(state,): count for state, count in figures.outbox.items()})
    gauge("imeisync_outbox_oldest_unsent_age_seconds",
          "Age of the oldest change the registry has not answered (0: none)",
          figures.oldest_unsent_age or 0)
    rejected = CounterMetricFamily("imeisync_rejected_changes",
                                   "Changes the registry rejected (local and central state "
                                   "disagree: investigate each)")
    rejected.add_metric([], figures.outbox.get("rejected", 0))
    out.append(rejected)
    labelled(CounterMetricFamily("imeisync_orders", "Police orders received, by kind and outcome",
                                 labels=["kind", "outcome"]), figures.orders)
    gauge("imeisync_receipts_overdue_lifts",
          "Our lifts not applied by every recipient operator within [sync] receipt_deadline",
          figures.overdue_lifts)
    labelled(GaugeMetricFamily("imeisync_disputes_open",
                               "Open disputes: received (about our records, to answer) and "
                               "filed (by us, awaiting the owner)", labels=["direction"]),
             {(direction,): count for direction, count in figures.disputes_open.items()})
    last = GaugeMetricFamily("imeisync_sync_last_success_timestamp_seconds",
                             "When each sync step last succeeded (Unix time)", labels=["step"])
    failing = GaugeMetricFamily("imeisync_sync_step_failing",
                                "1 if the step's last attempt failed", labels=["step"])
    for step, info in sorted(figures.steps.items()):
        if info.get("last_success"):
            last.add_metric([step], info["last_success"])
        failing.add_metric([step], 1 if info.get("last_error") else 0)
    out += [last, failing]
    gauge("imeisync_sync_feed_position", "Registry feed position applied here", figures.cursor)
    gauge("imeisync_sync_feed_head", "Registry feed head at the last pull", figures.head)
    gauge("imeisync_sync_feed_lag", "Feed entries the registry had that are not applied here",
          figures.feed_lag)
    gauge("imeisync_reconcile_blocked_by_shrink_guard",
          "1 while the last reconcile was refused by the shrink guard",
          1 if figures.reconcile_refused else 0)
    audit = figures.audit or {}
    gauge("imeisync_audit_chain_intact",
          "1 if the last verification found the audit chain intact, 0 if broken",
          (1 if audit.get("ok") else 0) if audit else None)
    gauge("imeisync_audit_last_verified_timestamp_seconds", "When the audit chain was verified",
          audit.get("at_epoch") if audit else None)
    gauge("imeisync_leader", "1 while this daemon runs the sync jobs", int(bool(
        leader.get("this_node"))))
    ready = [w for w in workers if (w.get("health") or {}).get("ready")
             and w.get("age", 1e9) < WORKER_STALE_AFTER]
    gauge("imeisync_attach_workers", "Attach-check worker processes configured",
          expected_workers)
    gauge("imeisync_attach_workers_ready",
          "Attach-check workers answering from a loaded index", len(ready))
    runs = CounterMetricFamily("imeisync_job_runs", "Scheduled job runs on this daemon",
                               labels=["job", "result"])
    seconds = GaugeMetricFamily("imeisync_job_last_duration_seconds",
                                "How long each job's last run took", labels=["job"])
    success = GaugeMetricFamily("imeisync_job_last_success_timestamp_seconds",
                                "When each job last succeeded on this daemon", labels=["job"])
    for job, info in sorted(jobs.items()):
        runs.add_metric([job, "ok"], info.get("ok", 0))
        runs.add_metric([job, "failed"], info.get("failed", 0))
        if info.get("last_duration") is not None:
            seconds.add_metric([job], info["last_duration"])
        if info.get("last_success") is not None:
            success.add_metric([job], info["last_success"])
    out += [runs, seconds, success]
    return out
