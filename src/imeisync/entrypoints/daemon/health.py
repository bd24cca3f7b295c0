"""What the daemon says about itself: ``/healthz`` and ``/metrics`` on the API listener, and the
telemetry thread that keeps the operations figures and the run-time board current.

A mixin of the supervisor (``Daemon``): it reads the supervisor's state and owns none of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, generate_latest

from imeisync.entrypoints.daemon.ports import probe
from imeisync.entrypoints.telemetry import (
    WORKER_STALE_AFTER,
    Board,
    eir_families,
    ops_families,
    render,
)
from imeisync.services.operations import OpsFigures, OpsReader

if TYPE_CHECKING:
    from imeisync.adapters.leader import Leadership
    from imeisync.bootstrap import App
    from imeisync.config import Config
    from imeisync.entrypoints.daemon.api_listener import ApiListener
    from imeisync.entrypoints.daemon.children import EirChild
    from imeisync.entrypoints.daemon.s13_child import S13Child

log = logging.getLogger("imeisync.daemon")


class DaemonHealth:
    # The supervisor's state this reads (set by ``Daemon.__init__``).
    config: Config
    app: App
    board: Board | None
    leadership: Leadership | None
    coordinator: Any
    jobs: Any
    eir: EirChild | None
    s13: S13Child | None
    api: ApiListener | None
    api_error: str | None
    eir_listen: str
    eir_tls: bool
    expected_workers: int
    started: float
    ready_at: float | None
    stopping: bool
    figures: OpsFigures
    _reader: OpsReader | None
    _store_problem: str | None
    _telemetry_stop: threading.Event
    _telemetry_beat: float

    def store_ready(self) -> bool:
        raise NotImplementedError

    def _ready_workers(self) -> list[dict[str, Any]]:
        assert self.board is not None
        return [w for w in self.board.workers() if (w.get("health") or {}).get("ready")
                and w["age"] < WORKER_STALE_AFTER]

    def _telemetry_loop(self) -> None:
        last_read = 0.0
        while not self._telemetry_stop.wait(1.0):
            self._telemetry_beat = time.monotonic()
            try:
                job_ran = self.jobs is not None and self.jobs.finished.is_set()
                if (job_ran or time.monotonic() - last_read >= 5) and self.store_ready():
                    if job_ran:
                        self.jobs.finished.clear()
                    if self._reader is None:
                        self._reader = self.app.ops_reader()
                    self.figures = self._reader.read()
                    last_read = time.monotonic()
                if self.board is not None:
                    self.board.write_daemon(self._summary(), self._daemon_metrics())
            except Exception:
                log.exception("telemetry update failed")

    def _leader_info(self) -> dict[str, Any]:
        info = self.leadership.describe() if self.leadership is not None else {}
        info["this_node"] = bool(self.coordinator and self.coordinator.is_leader)
        if self.figures.leader:
            info["last_elected"] = self.figures.leader
        return info

    def _summary(self) -> dict[str, Any]:
        return {"sync": self.figures.summary(), "leader": self._leader_info()}

    def _daemon_metrics(self) -> bytes:
        jobs = self.jobs.stats if self.jobs is not None else {}
        workers = self.board.workers() if self.board is not None else []
        families = ops_families(self.figures, jobs, self._leader_info(), workers,
                                self.expected_workers)
        return render(families) + generate_latest(REGISTRY)

    def metrics_text(self) -> bytes:
        """``/metrics`` on the API listener: every attach-check worker (N5g-eir and S13, one
        family each, label ``interface``) and the daemon."""
        assert self.board is not None
        families = self.s13.families(self.board) if self.s13 is not None \
            else eir_families(self.board)
        return render(families) + self._daemon_metrics()

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz`` on the API listener: 200 while attach checks can be answered."""
        ready = self._ready_workers()
        freshest = ready[0]["health"] if ready else {}
        answering = bool(ready)
        if not answering and self.eir is not None and self.eir.alive():
            # No fresh worker figures (a stuck snapshot thread?): ask the listener itself.
            answer = probe(self.eir_listen, tls=self.eir_tls, timeout=1)
            if answer is not None and answer[0] == 200:
                answering = True
                with contextlib.suppress(ValueError, KeyError):
                    freshest = json.loads(answer[1])["attach_index"]
        f = self.figures
        registry_ok = f.registry_reachable()
        if self.stopping:
            status, answering = "stopping", False  # load balancers: drain this node
        elif not answering:
            status = "starting" if self.ready_at is None else "unavailable"
        elif f.database_reachable and freshest.get("database_reachable") and registry_ok \
                is not False and not f.reconcile_refused and (f.audit or {}).get("ok", True):
            status = "ok"
        else:
            status = "degraded"
        keys = self.app.__dict__.get("trusted_keys")
        body = {
            "status": status,
            "attach_check": {
                "answering": answering, "listen": self.eir_listen,
                "workers": self.expected_workers, "ready_workers": len(ready),
                **{k: freshest.get(k) for k in ("entries", "blocked", "tracked", "seq",
                                                 "source", "last_refresh",
                                                 "staleness_seconds")},
                # [eir] unknown_tac, the TAC table's size and whether the policy applies
                "unknown_tac": self.config.eir.unknown_tac,
                **{k: freshest.get(k) for k in ("tac_table_size", "unknown_tac_applied")},
            },
            "database": {"reachable": f.database_reachable and bool(
                freshest.get("database_reachable", True)),
                "last_error": f.database_error or freshest.get("last_error")
                or self._store_problem},
            "registry": {"url": self.config.registry.url, **f.summary()},
            "leader": self._leader_info(),
            "police_keys": {"loaded": keys is not None,
                            "kids": keys.kids if keys is not None else []},
            "api": {"police_api": self.api is not None and self.api.asgi is not None
                    and getattr(self.api.asgi, "inner", None) is not None,
                    "error": self.api_error},
            "uptime_seconds": round(time.time() - self.started),
        }
        if self.s13 is not None:
            body["s13"] = s13 = self.s13.state()
            if not s13["answering"] and status == "ok":
                body["status"] = "degraded"
        return (200 if answering else 503), body


