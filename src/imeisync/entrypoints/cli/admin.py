"""``imeisync db upgrade`` and ``imeisync audit verify``: the store's upkeep."""

from __future__ import annotations

import sys

from imeisync.entrypoints.cli.base import Context, cli, pass_ctx


@cli.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@pass_ctx
def db_upgrade(ctx: Context) -> None:
    """Apply schema migrations (take a backup first)."""
    before, after = ctx.app.upgrade_schema()
    if before == after:
        ctx.emit(f"schema already at revision {after}", {"before": before, "after": after})
    else:
        ctx.emit(f"schema upgraded from {before or 'empty'} to {after}",
                 {"before": before, "after": after})


@cli.group()
def audit() -> None:
    """The audit trail."""


@audit.command("verify")
@pass_ctx
def audit_verify(ctx: Context) -> None:
    """Check the audit trail's hash chain; name the first broken event."""
    result = ctx.app.verify_audit()
    ctx.emit(result.describe(), {"ok": result.ok, "events": result.events,
                                 "broken_event": result.broken_id, "problem": result.problem})
    if not result.ok:
        sys.exit(1)
