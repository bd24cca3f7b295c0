"""The S13 (Diameter) listener as a child of the supervisor, and what the daemon says about it.

``python -m imeisync.entrypoints.s13`` (``[s13] listen`` set): one asyncio process with its own
attach index. It writes its figures to the run folder once a second (``s13-<pid>.json``); the
supervisor reads them to ask whether it answers (a fresh snapshot: its loop runs — a TCP
connect would succeed against a stopped process too), for readiness (index loaded), for
``/healthz`` (peers by host) and for ``/metrics`` (its attach checks in the shared families with
``interface="s13"``, plus its own families). On SIGTERM it sends DPR to every peer before it
exits; the supervisor therefore signals it before the other children.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from imeisync.config import Config
from imeisync.domain.errors import BadInput
from imeisync.entrypoints.daemon.children import Child
from imeisync.entrypoints.eir_metrics import Metrics
from imeisync.entrypoints.telemetry import WORKER_STALE_AFTER, Board, merge

FRESH = 2.5  # seconds: a snapshot younger than this means the listener's loop runs (1 s cadence)


def check_s13_config(config: Config) -> None:
    """Refuse a bad ``[s13]`` before anything starts (with the key named)."""
    s13_listen = config.s13.listen
    if s13_listen is None:
        return
    from imeisync.entrypoints.s13 import check_transport, settings_from

    settings_from(config)
    check_transport(config)
    for section, listen in (("eir", config.eir.listen), ("api", config.api.listen)):
        if s13_listen.address == listen.address:
            raise BadInput(f"[s13] listen and [{section}] listen are both {listen}",
                           "give S13 its own port (Diameter's is 3868)")


class S13Child(Child):
    """The S13 listener: started, probed, replaced when hung, restarted with back-off and
    stopped like the attach-check server (``Child``)."""

    kind = "S13 (Diameter) listener"
    slug = "s13"
    stop_first = True  # SIGTERM before the others: it says goodbye (DPR) to its peers

    @property
    def listen(self) -> str:
        return str(self.config.s13.listen)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "imeisync.entrypoints.s13", *self.config_args()]

    def describe(self) -> str:
        return f" on {self.listen} ({self.config.s13.transport})"

    def snapshot(self) -> dict[str, Any]:
        """This process's last figures on the board ({} before its first)."""
        from imeisync.entrypoints.s13 import read_snapshots

        pid = self.pid
        for snap in read_snapshots(self.board.folder):
            if snap.get("pid") == pid:
                return snap
        return {}

    def ping(self, timeout: float = 2.0) -> bool:
        return float(self.snapshot().get("age", 1e9)) < FRESH

    def state(self) -> dict[str, Any]:
        """For readiness and ``/healthz``: ``answering`` once it listens with its index loaded
        and wrote within ``WORKER_STALE_AFTER``."""
        snap = self.snapshot()
        answering = bool(snap.get("ready")) and snap.get("age", 1e9) < WORKER_STALE_AFTER \
            and self.alive()
        return {"answering": answering, "listen": snap.get("listen") or self.listen,
                "transport": self.config.s13.transport,
                "peers": snap.get("peers") or {}, "connections": snap.get("connections", 0)}

    def families(self, board: Board) -> list[Metric]:
        """The attach-check families of every N5g-eir worker and of this listener (label
        ``interface``), then this listener's own families."""
        snap = self.snapshot()
        if not snap:
            return merge(Metrics.from_snapshot(s) for s in board.workers())
        from imeisync.entrypoints.s13 import S13Figures

        figures = S13Figures(snap)
        shared = merge([*(Metrics.from_snapshot(s) for s in board.workers()), _Shared(figures)])
        return shared + list(figures.own())


class _Shared(Collector):
    """The S13 families the N5g-eir workers also export, as a collector for ``merge``."""

    def __init__(self, figures: Any):
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        yield from self.figures.shared()
