"""The app each attach-check worker of the daemon serves: Granian's factory
(``imeisync.entrypoints.daemon.eir_worker:eir_worker_app``). One function, so the server
interface (RSGI) can be replaced in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imeisync.config import load_config
from imeisync.entrypoints.daemon.children import worker_startup

if TYPE_CHECKING:  # imported after worker_startup(): the start-up signal window stays short
    from imeisync.entrypoints.eir import EirApp


def eir_worker_app() -> EirApp:
    """Granian's factory in each attach-check worker the daemon runs: ``eir.app_from_config``,
    which inside the daemon also writes the worker's figures to the run-time board and serves
    every worker's and the daemon's on ``/metrics`` and ``/healthz``."""
    worker_startup()  # before the index load, which can take a while
    from imeisync.entrypoints.eir import app_from_config

    return app_from_config(load_config())
