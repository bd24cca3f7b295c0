"""The app each attach-check worker of the daemon serves: Granian's factory
(``imeisync.entrypoints.daemon.eir_worker:eir_worker_app``). One function, so the server
interface (ASGI today) can be replaced in one place."""

from __future__ import annotations

from typing import Any

from imeisync.config import load_config
from imeisync.entrypoints.asgi import ASGIApp
from imeisync.entrypoints.daemon.children import worker_startup
from imeisync.entrypoints.telemetry import WORKER_STALE_AFTER, Board


def eir_worker_app() -> ASGIApp:
    """Granian's factory in each attach-check worker the daemon runs (``eir.app_from_config``
    plus the board: figures out, daemon figures in)."""
    worker_startup()  # before the index load, which can take a while
    from imeisync.bootstrap import index_keeper
    from imeisync.entrypoints.eir import KeeperLookup, Metrics, create_app
    from imeisync.entrypoints.telemetry import SnapshotWriter, worker_metrics_renderer

    config = load_config()
    board = Board.from_environment()
    keeper = index_keeper(config).start()
    lookup = KeeperLookup(keeper)
    metrics = Metrics(lookup)
    if board is None:  # served outside the daemon: the plain attach-check app
        return create_app(lookup, unknown_status=config.get("eir", "unknown_status"),
                          metrics=metrics)
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

    return create_app(lookup, unknown_status=config.get("eir", "unknown_status"),
                      extra_health=daemon_health, metrics=metrics,
                      render_metrics=worker_metrics_renderer(board, metrics))

