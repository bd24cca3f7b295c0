"""``SyncService``: the registry connection and settings the sync's use cases share, one
method per use case, each recording its success or error in ``sync_state``."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from imeisync.adapters.registry_client import RegistryClient
from imeisync.adapters.registry_receipts import fetch_members
from imeisync.domain.errors import ImeisyncError
from imeisync.domain.times import rfc3339
from imeisync.services.sync import pull as _pull
from imeisync.services.sync import push as _push
from imeisync.services.sync import receipts as _receipts
from imeisync.services.sync import reconcile as _reconcile
from imeisync.services.sync import sightings as _sightings
from imeisync.services.sync import status as _status
from imeisync.services.sync.results import (
    PullResult,
    PushResult,
    ReceiptsResult,
    ReconcileResult,
)
from imeisync.store import sync_state
from imeisync.store.db import Database

log = logging.getLogger(__package__)

FAILURES = Counter("imeisync_sync_failures", "Sync steps that failed", ["step"])


def _now() -> datetime:
    return datetime.now(UTC)


class SyncService:
    def __init__(
        self,
        db: Database,
        client: Callable[[], RegistryClient],
        *,
        operator_id: str,
        operator_country: str,
        max_shrink: float = 0.25,
        spool_dir: Path | None = None,
        receipt_deadline: float = 7200.0,
        clock: Callable[[], datetime] = _now,
        alerts: bool = False,
    ):
        self.db = db
        self._client_factory = client
        self._client: RegistryClient | None = None
        self.me = operator_id
        self.country = operator_country
        self.max_shrink = max_shrink
        self.spool_dir = spool_dir
        self.receipt_deadline = receipt_deadline
        self.clock = clock
        self.alerts = alerts  # [sightings] webhook_url set: received notices are alerted too

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    @contextlib.contextmanager
    def _step(self, step: str) -> Iterator[None]:
        """Record the step's success (or its error, and a metric) in ``sync_state``; each
        step is a run with its own budget of retries (``adapters/registry_retry.py``)."""
        if self._client is not None:
            self._client.policy.new_run()
        try:
            yield
        except ImeisyncError as exc:
            FAILURES.labels(step).inc()
            log.warning("sync %s failed: %s", step, exc)
            with contextlib.suppress(ImeisyncError), self.db.write() as session:
                sync_state.put(session, sync_state.last_error(step),
                               json.dumps({"at": rfc3339(self.clock()), "error": str(exc)[:500],
                                           "code": exc.code}), self.clock())
            raise
        with self.db.write() as session:
            now = self.clock()
            sync_state.put(session, sync_state.last_success(step), rfc3339(now) or "", now)
            sync_state.drop(session, sync_state.last_error(step))

    def push(self, *, batch_size: int = _push.MAX_BATCH,
             max_batches: int | None = None) -> PushResult:
        """Send pending (and unanswered sent) outbox changes; mark each with its answer.
        Then the pending sighting notices (their failure is noted as the ``sightings`` step's
        and neither undoes nor fails the changes' push: they are retried next time)."""
        with self._step("push"):
            result = _push.push(self, batch_size, max_batches)
        with contextlib.suppress(ImeisyncError), self._step("sightings"):
            result.sightings = _sightings.push(self)
        return result

    def pull(self, *, page_size: int = 5000, max_pages: int | None = None) -> PullResult:
        """Apply feed pages from the cursor until the registry has nothing newer, then tell
        the registry how far we applied (an ack failing does not undo or fail the pull)."""
        with self._step("pull"):
            result = _pull.pull(self, page_size, max_pages)
        with contextlib.suppress(ImeisyncError), self._step("ack"):
            result.acked = _receipts.acknowledge(self)
        return result

    def receipts(self, *, limit: int = _receipts.POLL_LIMIT) -> ReceiptsResult:
        """Fetch the registry's receipts of our changes not yet applied everywhere."""
        with self._step("receipts"):
            return _receipts.poll(self, limit)

    def members(self, *, if_missing: bool = False) -> int | None:
        """Fetch and cache the registry's signed member directory (for lift notices); the
        number of members, or None when ``if_missing`` and one is cached already."""
        if if_missing:
            with self.db.read() as session:
                if sync_state.read(session, (sync_state.MEMBERS,)).text(sync_state.MEMBERS):
                    return None
        with self._step("members"):
            members, token = fetch_members(self.client)
            with self.db.write() as session:
                sync_state.put(session, sync_state.MEMBERS, token, self.clock())
            return len(members)

    def reconcile(self, *, force: bool = False) -> ReconcileResult:
        """Repair foreign records from a verified snapshot, under the shrink guard."""
        with self._step("reconcile"):
            return _reconcile.reconcile(self, force)

    def cursor(self) -> int:
        return self.cursor_or_none() or 0

    def cursor_or_none(self) -> int | None:
        with self.db.read() as session:
            return sync_state.read(session, (sync_state.CURSOR,)).cursor

    def status(self, *, rejected_limit: int = 20) -> dict[str, Any]:
        return _status.status(self, rejected_limit)
