"""Attach-check figures: plain integer counters on the hot path, Prometheus families on scrape.

``prometheus_client``'s own Counter/Histogram take a lock per call. Here an answer costs two
list-slot increments and a float add in the worker's one Python thread (Granian runs the app
on its event-loop thread only), so no lock is needed and nothing is kept per request; the
figures are exact. Each worker process is one ``worker`` label; ``interface`` says which
listener answered (``n5g-eir`` here, ``s13`` for Diameter), under the same family names.

Workers hand their figures to the daemon as ``snapshot()`` dicts (``telemetry.Board``);
``from_snapshot`` turns one back into a collector with the same families.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from imeisync.adapters.sighting_queue import SightingFigures

N5G_EIR = "n5g-eir"

# Outcome labels, by index into ``counts``.
# ``congested``: refused by admission control (``admission``), answered 503 / 3004 at once.
OUTCOMES = ("WHITELISTED", "BLACKLISTED", "GREYLISTED", "NOT_FOUND", "bad_request",
            "method_not_allowed", "error", "not_ready", "congested")
BAD_REQUEST, METHOD_NOT_ALLOWED, ERROR, NOT_READY, CONGESTED = (
    OUTCOMES.index(n) for n in ("bad_request", "method_not_allowed", "error", "not_ready",
                                "congested"))
BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3)


def latency_histogram(labels: list[str], counts: list[int], total: float) -> HistogramMetricFamily:
    """``imeisync_attach_check_seconds`` from per-bucket counts (one per ``BUCKETS`` bound, then
    +Inf) and the sum: the one shape every attach-check interface (N5g-eir, S13) reports."""
    latency = HistogramMetricFamily(
        "imeisync_attach_check_seconds",
        "Time to answer an attach check inside the application",
        labels=["worker", "interface"])
    cumulative, acc = [], 0
    for bound, value in zip((*BUCKETS, float("inf")), counts, strict=False):
        acc += int(value)
        cumulative.append((repr(bound) if bound != float("inf") else "+Inf", acc))
    latency.add_metric(labels, cumulative, total)
    return latency

_INDEX_GAUGES = (
    ("imeisync_attach_index_entries", "Devices with an open record in the index", "entries"),
    ("imeisync_attach_index_blocked", "Blocked keys in the index", "blocked"),
    ("imeisync_attach_index_tracked", "Tracked keys in the index", "tracked"),
    ("imeisync_attach_index_seq", "Change sequence the index reflects", "seq"),
    ("imeisync_attach_index_staleness_seconds",
     "Seconds since the index last caught up with the store", "staleness_seconds"),
    ("imeisync_attach_index_database_reachable", "1 if the last poll of the store succeeded",
     "database_reachable"),
    ("imeisync_attach_violations",
     "BLACKLISTED answers for devices whose every record was closed over a minute earlier "
     "(should stay 0)", "violations"),
)


class Metrics(Collector):
    """One worker's attach-check figures. The hot path writes ``counts[outcome] += 1``,
    ``buckets[bisect_left(BUCKETS, seconds)] += 1`` and ``latency[0] += seconds`` itself
    (``observe`` does the same for callers off the hot path)."""

    def __init__(self, health: Callable[[], dict[str, Any]], interface: str = N5G_EIR,
                 worker: str | None = None):
        self.health = health
        self.interface = interface
        self.worker = worker or str(os.getpid())
        self.counts = [0] * len(OUTCOMES)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency = [0.0]  # a list so the hot path's closure adds without an attribute store
        self.sightings: SightingFigures | None = None  # the process's sighting figures

    def observe(self, outcome: int, seconds: float) -> None:
        from bisect import bisect_left

        self.counts[outcome] += 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.latency[0] += seconds

    @property
    def latency_sum(self) -> float:
        return self.latency[0]

    def snapshot(self, health: dict[str, Any]) -> dict[str, Any]:
        """What a worker writes to the daemon's board (copies: the hot path keeps counting)."""
        snap = {"pid": int(self.worker) if self.worker.isdigit() else self.worker,
                "interface": self.interface, "counts": list(self.counts),
                "buckets": list(self.buckets), "latency_sum": self.latency[0],
                "health": health}
        if self.sightings is not None:
            snap["sightings"] = self.sightings.snapshot()
        return snap

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> Metrics:
        health = dict(snapshot.get("health") or {})
        figures = cls(lambda: health, snapshot.get("interface") or N5G_EIR,
                      str(snapshot["pid"]))
        counts = list(snapshot.get("counts") or [])
        buckets = list(snapshot.get("buckets") or [])
        figures.counts = (counts + [0] * len(OUTCOMES))[:len(OUTCOMES)]
        figures.buckets = (buckets + [0] * (len(BUCKETS) + 1))[:len(BUCKETS) + 1]
        figures.latency = [float(snapshot.get("latency_sum") or 0.0)]
        if isinstance(snapshot.get("sightings"), dict):
            figures.sightings = SightingFigures.from_snapshot(
                figures.worker, figures.interface, snapshot["sightings"])
        return figures

    def collect(self) -> Iterator[Any]:
        labels = [self.worker, self.interface]
        checks = CounterMetricFamily(
            "imeisync_attach_checks", "Attach checks answered, by interface and outcome",
            labels=["worker", "interface", "outcome"])
        for name, value in zip(OUTCOMES, self.counts, strict=True):
            checks.add_metric([*labels, name], value)
        yield checks
        yield latency_histogram(labels, self.buckets, self.latency[0])
        health = self.health()
        for name, doc, field in _INDEX_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["worker"])
            gauge.add_metric([self.worker], float(health.get(field) or 0))
            yield gauge
        if self.sightings is not None:
            yield from self.sightings.collect()
