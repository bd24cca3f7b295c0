"""The daemon's scheduled work: APScheduler 3.x jobs, run only by the leader.

=============  ==========================================  ===================================
job            when                                        does
=============  ==========================================  ===================================
push           every ``push_interval``, and within a        send the outbox (and sighting
               second of a new pending outbox change       notices) to the registry
               or sighting notice
pull           every ``pull_interval``                      apply the registry's feed
reconcile      daily at ``reconcile_at`` (local time)       repair foreign records from a
                                                           snapshot, under the shrink guard
audit          daily, 30 min after ``reconcile_at``         verify the audit hash chain; a
                                                           broken chain is an alert, not a crash
retention      daily, 60 min after ``reconcile_at``         purge the free texts of cases closed
                                                           over ``retention_days`` ago; delete
                                                           foreign records closed over
                                                           ``foreign_retention_days`` ago and
                                                           sightings seen over ``[sightings]
                                                           retention_days`` ago
alerts         every ``ALERTS_EVERY`` seconds, when          deliver due sighting alerts to the
               ``[sightings] webhook_url`` is set           police unit's endpoint (a thread of
                                                           its own: a hanging endpoint holds
                                                           only this job)
=============  ==========================================  ===================================

Every job has ``max_instances=1`` (a slow run is never overlapped by the next), ``coalesce``
(runs missed while one was busy become one) and a misfire grace (a run late by less than it
still happens). A failure is logged with its cause, counted, recorded in ``sync_state`` by the
sync service and retried at the next run; nothing is raised into the scheduler.

The ``Coordinator`` thread does what must not wait behind a long job: it keeps (or tries to take)
the leadership every ``elect_every`` seconds, and while leading it looks at the outbox twice a
second — one indexed query — and starts the push job at once when an order (accepted by this
daemon, another one, the CLI or the API) left a pending change, or the attach check left a
sighting notice for another operator. When a node becomes leader it
pushes and pulls at once, and runs a daily job that has not succeeded for 25 hours (a missed
03:30 because the previous leader died at 03:29, or a fresh install) right away.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import select

from imeisync.adapters.leader import Leadership, node_name
from imeisync.bootstrap import App
from imeisync.domain.errors import ImeisyncError
from imeisync.domain.times import epoch_of, rfc3339
from imeisync.entrypoints.logs import event
from imeisync.services.sighting_alerts import AlertSender
from imeisync.services.sync import ShrinkRefused, SyncService
from imeisync.store import sync_state
from imeisync.store.models import OutboxChange, SightingNotice

log = logging.getLogger("imeisync.daemon.jobs")

JOBS = ("push", "pull", "reconcile", "audit", "retention", "alerts")
DAILY = ("reconcile", "audit", "retention")
CATCH_UP_AFTER = 25 * 3600  # a daily job that has not succeeded for this long runs now
WATCH_EVERY = 0.5  # seconds between looks at the outbox while leading
ALERTS_EVERY = 5.0  # seconds between sighting-alert deliveries (services/sighting_alerts.py)


class Jobs:
    """The scheduler and the job bodies. ``is_leader`` decides whether a job does anything."""

    def __init__(self, app: App, is_leader: Callable[[], bool],
                 store_ready: Callable[[], bool] = lambda: True):
        self.app = app
        self.is_leader = is_leader
        self.store_ready = store_ready
        config = app.config
        self.push_every = config.sync.push_interval
        self.pull_every = config.sync.pull_interval
        self.reconcile_at = config.sync.reconcile_at
        self.stats: dict[str, dict[str, Any]] = {
            job: {"ok": 0, "failed": 0, "skipped": 0, "running": False, "last_duration": None,
                  "last_success": None, "failures_in_a_row": 0, "last_error": None}
            for job in JOBS}
        self.push_lock = threading.Lock()  # the push job and the final push at shutdown
        self.finished = threading.Event()  # set after every run: the figures are worth a look
        self._services: dict[str, SyncService] = {}
        self._alerts: AlertSender | None = None
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=len(JOBS))},
            job_defaults={"max_instances": 1, "coalesce": True},
        )

    # -- schedule ---------------------------------------------------------------------------

    def start(self) -> None:
        s = self.scheduler
        s.add_job(self._runner("push", self.push), IntervalTrigger(seconds=self.push_every),
                  id="push", name="push", misfire_grace_time=max(1, int(self.push_every)))
        s.add_job(self._runner("pull", self.pull), IntervalTrigger(seconds=self.pull_every),
                  id="pull", name="pull", misfire_grace_time=max(1, int(self.pull_every)))
        hour, minute = self.reconcile_at
        for job, offset, body in (("reconcile", 0, self.reconcile), ("audit", 30, self.audit),
                                  ("retention", 60, self.retention)):
            total = hour * 60 + minute + offset
            s.add_job(self._runner(job, body),
                      CronTrigger(hour=(total // 60) % 24, minute=total % 60),
                      id=job, name=job, misfire_grace_time=3600)
        if self.app.config.sightings.webhook_url:
            s.add_job(self._runner("alerts", self.alerts), IntervalTrigger(seconds=ALERTS_EVERY),
                      id="alerts", name="alerts", misfire_grace_time=int(ALERTS_EVERY))
        s.start()
        log.info("scheduler started: push every %ss, pull every %ss, reconcile daily at "
                 "%02d:%02d (%s), audit and retention 30 and 60 min later",
                 _num(self.push_every), _num(self.pull_every), hour, minute, s.timezone)

    def run_now(self, job: str) -> None:
        """Start ``job`` as soon as a thread is free (never a second instance of it)."""
        if self.stats[job]["running"]:
            return
        with contextlib.suppress(Exception):  # the scheduler may be shutting down
            self.scheduler.modify_job(job, next_run_time=datetime.now(self.scheduler.timezone))

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)

    def running(self) -> list[str]:
        return [job for job, info in self.stats.items() if info["running"]]

    def close(self) -> None:
        for service in self._services.values():
            with contextlib.suppress(Exception):
                service.close()
        if self._alerts is not None:
            self._alerts.close()

    # -- running ----------------------------------------------------------------------------

    def _runner(self, job: str, body: Callable[[], str]) -> Callable[[], None]:
        def run() -> None:
            self.run_job(job, body)

        run.__name__ = f"imeisync_{job}"
        return run

    def run_job(self, job: str, body: Callable[[], str]) -> bool:
        info = self.stats[job]
        if not self.is_leader() or not self.store_ready():
            info["skipped"] += 1
            return False
        info["running"] = True
        started = time.monotonic()
        try:
            message = body()
        except ShrinkRefused as exc:
            self._failed(job, info, started, exc, alert=True)
            return False
        except ImeisyncError as exc:
            self._failed(job, info, started, exc)
            return False
        except Exception as exc:
            self._failed(job, info, started, exc, unexpected=True)
            return False
        finally:
            info["running"] = False
            self.finished.set()
        duration = time.monotonic() - started
        if info["failures_in_a_row"]:
            event(log, logging.WARNING, "job.recovered",
                  f"{job} works again after {info['failures_in_a_row']} failed run(s)", job=job)
        info.update(ok=info["ok"] + 1, last_duration=round(duration, 3),
                    last_success=time.time(), failures_in_a_row=0, last_error=None)
        quiet = message.startswith(("push: nothing to send", "pull: 0 feed entries",
                                    "alerts: nothing due"))
        event(log, logging.DEBUG if quiet else logging.INFO, "job.done", message, job=job,
              duration_ms=round(duration * 1000))
        return True

    def _failed(self, job: str, info: dict[str, Any], started: float, exc: Exception, *,
                alert: bool = False, unexpected: bool = False) -> None:
        duration = time.monotonic() - started
        info.update(failed=info["failed"] + 1, last_duration=round(duration, 3),
                    failures_in_a_row=info["failures_in_a_row"] + 1,
                    last_error=str(exc)[:500])
        next_run = self._next_run(job)
        fields = {"job": job, "duration_ms": round(duration * 1000),
                  "failures_in_a_row": info["failures_in_a_row"],
                  "error_type": type(exc).__name__, "next_run": next_run}
        if unexpected:
            log.error("%s failed unexpectedly: %s: %s; retrying at the next run (%s)", job,
                      type(exc).__name__, exc, next_run, exc_info=exc,
                      extra={"event": "job.failed", "fields": fields})
            return
        event(log, logging.ERROR if alert else logging.WARNING,
              "job.alert" if alert else "job.failed",
              f"{job} failed: {exc}; retrying at the next run ({next_run})", **fields)

    def _next_run(self, job: str) -> str | None:
        with contextlib.suppress(Exception):
            found = self.scheduler.get_job(job)
            if found is not None and found.next_run_time is not None:
                return str(found.next_run_time.isoformat(timespec="seconds"))
        return None

    def _service(self, job: str) -> SyncService:
        if job not in self._services:
            self._services[job] = self.app.sync()
        return self._services[job]

    # -- the job bodies ---------------------------------------------------------------------

    def push(self) -> str:
        with self.push_lock:
            return self._service("push").push().describe()

    def final_push(self, timeout: float = 10.0) -> str:
        """At shutdown: one quick attempt (no retries, short timeouts) unless a push job is
        still running, which is then the last attempt."""
        if not self.push_lock.acquire(timeout=timeout):
            return "push: a push was still running at shutdown; it was the last attempt"
        try:
            service = self.app.sync(client_options={"retries": 0, "timeout": (2.0, 5.0)})
            try:
                return service.push().describe()
            finally:
                service.close()
        finally:
            self.push_lock.release()

    def pull(self) -> str:
        service = self._service("pull")
        pulled = service.pull().describe()
        try:  # receipts of ours ride on the pull's schedule; their failure is the pull's note
            service.members(if_missing=True)
            return f"{pulled}; {service.receipts().describe()}"
        except ImeisyncError as exc:
            return f"{pulled}; receipts not fetched: {exc}"

    def reconcile(self) -> str:
        service = self._service("reconcile")
        text = service.reconcile().describe()
        with contextlib.suppress(ImeisyncError):  # the daily refresh of the member directory
            service.members()
        return text

    def audit(self) -> str:
        result = self.app.verify_audit()
        now = time.time()
        sync_state.save(self.app.db, sync_state.AUDIT, json.dumps({
            "at": rfc3339(now), "at_epoch": now, "ok": result.ok, "events": result.events,
            "broken_event": result.broken_id, "problem": result.problem}))
        if not result.ok:
            event(log, logging.ERROR, "audit.broken",
                  f"ALERT: {result.describe()} — the audit trail was altered outside "
                  "imeisync; keep the database as it is and investigate",
                  broken_event=result.broken_id)
        return result.describe()

    def retention(self) -> str:
        result = self.app.purge_retention()
        sightings, cutoff = self.app.purge_sightings()
        sync_state.save(self.app.db, sync_state.RETENTION_SUCCESS, rfc3339(time.time()) or "")
        return f"{result.describe()}; deleted {sightings} sighting(s) seen before {cutoff[:10]}"

    def alerts(self) -> str:
        if self._alerts is None:
            self._alerts = self.app.alert_sender()
        if self._alerts is None:
            return "alerts: nothing due (no [sightings] webhook_url)"
        return self._alerts.run().describe()

    # -- catching up ------------------------------------------------------------------------

    def overdue_daily_jobs(self) -> list[str]:
        """Daily jobs whose last success is older than ``CATCH_UP_AFTER`` (or never was)."""
        overdue = []
        now = time.time()
        with self.app.db.read() as session:
            state = sync_state.read(session, (sync_state.last_success("reconcile"),
                                              sync_state.AUDIT, sync_state.RETENTION_SUCCESS))
        verified = state.json(sync_state.AUDIT)
        for job, value in (
                ("reconcile", state.text(sync_state.last_success("reconcile"))),
                ("audit", verified.get("at") if isinstance(verified, dict) else None),
                ("retention", state.text(sync_state.RETENTION_SUCCESS))):
            last = epoch_of(value)
            if last is None or now - last > CATCH_UP_AFTER:
                overdue.append(job)
        return overdue


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class Coordinator:
    """Leadership and the outbox watch, in a thread of their own."""

    def __init__(self, app: App, jobs: Jobs, leadership: Leadership, *, elect_every: float,
                 store_ready: Callable[[], bool] = lambda: True):
        self.app = app
        self.jobs = jobs
        self.leadership = leadership
        self.elect_every = elect_every
        self.store_ready = store_ready
        self.is_leader = False
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self._last_elect = 0.0
        self._last_watch = 0.0
        self._watch_error = False

    def start(self) -> Coordinator:
        self._elect()
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < 30

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.heartbeat = time.monotonic()
            now = time.monotonic()
            if now - self._last_elect >= self.elect_every:
                self._elect()
            if self.is_leader and now - self._last_watch >= WATCH_EVERY:
                self._last_watch = now
                self._watch_outbox()

    def _elect(self) -> None:
        self._last_elect = time.monotonic()
        try:
            leading = self.leadership.tick()
        except Exception as exc:
            log.error("leader election failed: %s", exc)
            leading = False
        if leading and not self.is_leader:
            self.is_leader = True
            self._became_leader()
        elif not leading and self.is_leader:
            self.is_leader = False
            event(log, logging.WARNING, "leader.lost",
                  "this node no longer leads: sync jobs stop here", node=node_name())

    def _became_leader(self) -> None:
        event(log, logging.INFO, "leader.acquired",
              f"this node leads ({self.leadership.mode}): it runs the sync jobs",
              node=node_name(), mode=self.leadership.mode)
        if not self.store_ready():
            return
        with contextlib.suppress(ImeisyncError):
            sync_state.save(self.app.db, sync_state.LEADER, json.dumps(
                {"node": node_name(), "since": rfc3339(time.time()),
                 "mode": self.leadership.mode}))
        self.jobs.run_now("push")
        self.jobs.run_now("pull")
        try:
            overdue = self.jobs.overdue_daily_jobs()
        except ImeisyncError as exc:
            log.warning("could not check for overdue daily jobs: %s", exc)
            return
        for job in overdue:
            log.info("%s has not succeeded in the last %d hours: running it now", job,
                     CATCH_UP_AFTER // 3600)
            self.jobs.run_now(job)

    def _watch_outbox(self) -> None:
        if self.jobs.stats["push"]["running"] or not self.store_ready():
            return
        outbox = OutboxChange.__table__
        try:
            with self.app.db.read() as session:
                pending = session.execute(select(outbox.c.id).where(
                    outbox.c.state == "pending").order_by(outbox.c.id).limit(1)).first()
                if pending is None:  # a sighting notice for another operator goes as fast
                    notices = SightingNotice.__table__
                    pending = session.execute(select(notices.c.id).where(
                        notices.c.direction == "sent", notices.c.state == "pending")
                        .limit(1)).first()
        except ImeisyncError:
            self._watch_error = True  # the jobs report the database; no second message here
            return
        self._watch_error = False
        if pending is not None:
            self.jobs.run_now("push")
