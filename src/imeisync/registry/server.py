"""Serving the reference registry with Granian (``imeisync registry serve --config FILE``).

One worker process by default: the registry's writes are serialised by its database anyway
(SQLite ``BEGIN IMMEDIATE`` / a PostgreSQL advisory lock), and the reference registry is not a
capacity bottleneck; ``workers`` > 1 is fine with PostgreSQL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imeisync.registry.app import CONFIG_ENV
from imeisync.registry.config import RegistryConfig
from imeisync.registry.schema import ensure_schema
from imeisync.store.db import Database


def server(config: RegistryConfig, *, workers: int = 1, listen: str | None = None,
           **granian_options: Any) -> Any:
    """A Granian server for the registry (``.serve()`` blocks until SIGINT/SIGTERM)."""
    from imeisync.entrypoints.granian_server import build

    # Create (or refuse) the schema here, once, with a clear message, not in each worker.
    db = Database(config.database_url)
    try:
        ensure_schema(db)
    finally:
        db.dispose()
    os.environ[CONFIG_ENV] = str(Path(config.source).resolve())
    listen = listen or config.listen
    host, _, port = listen.rpartition(":")
    return build("imeisync.registry.app:create_app", host, int(port), workers=workers,
                 **granian_options)
