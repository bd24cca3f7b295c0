"""``imeisync``: the command line. Thin: parse, call a service, render.

This package assembles it: ``base`` holds the root group, and importing each command module
registers its commands on that group. The command modules import ``base``, never this package,
so the registration needs no import cycle.
"""

from __future__ import annotations

from imeisync.entrypoints.cli import (  # noqa: F401  (imported to register their commands)
    admin,
    devices,
    disputes,
    exceptions,
    keys,
    orders,
    receipts,
    registry,
    run,
    sightings,
    sync,
    tacs,
    tokens,
)
from imeisync.entrypoints.cli.base import Context, cli, main, pass_ctx

__all__ = ["Context", "cli", "main", "pass_ctx"]
