"""Synchronisation with the central registry, one module per use case: ``push`` the outbox,
``pull`` the feed, ``reconcile`` with a snapshot (its lines read by ``snapshot``), and
``status``; ``results`` holds what each reports and ``service`` the ``SyncService`` that runs
them. The daemon's scheduler calls ``push``/``pull``/``reconcile``; ``imeisync sync …`` calls
them by hand. The bulk SQL they share is ``store.bulk``; the sync's named values
(``sync_state``) are read and written only through ``store.sync_state``.

Every change to ``records`` appends a ``change_log`` row (the attach index follows it).
"""

from imeisync.services.sync.pull import PULLED
from imeisync.services.sync.push import MAX_BATCH, PUSH_RESULTS, REJECTED, SYSTEM_ACTOR
from imeisync.services.sync.reconcile import SHRINK_REFUSED
from imeisync.services.sync.results import (
    PullResult,
    PushResult,
    ReconcileResult,
    ShrinkRefused,
)
from imeisync.services.sync.service import FAILURES, SyncService

__all__ = [
    "FAILURES",
    "MAX_BATCH",
    "PULLED",
    "PUSH_RESULTS",
    "REJECTED",
    "SHRINK_REFUSED",
    "SYSTEM_ACTOR",
    "PullResult",
    "PushResult",
    "ReconcileResult",
    "ShrinkRefused",
    "SyncService",
]
