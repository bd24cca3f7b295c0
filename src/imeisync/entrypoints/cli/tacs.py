"""``imeisync tac import FILE.csv``: the TAC table (device names; unknown TACs caught)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.entrypoints.cli.orders import STAFF_HELP, _staff
from imeisync.services.tacs import import_tacs


@cli.group()
def tac() -> None:
    """The TAC table: which device model an IMEI's first 8 digits name."""


@tac.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def import_(ctx: Context, file: Path, staff: str | None) -> None:
    """Replace the TAC table with FILE (CSV: tac,brand,model,... as GSMA's TAC export; other
    columns kept). All or nothing: a bad line changes nothing."""
    started = time.monotonic()
    result = import_tacs(ctx.app.db, file, actor=_staff(staff), now=ctx.app.clock())
    seconds = time.monotonic() - started
    ctx.emit(f"{file}: TAC table replaced: {result.tacs} TACs ({result.added} added, "
             f"{result.changed} changed, {result.removed} removed, {result.unchanged} "
             f"unchanged) in {seconds:.1f}s",
             {"file": str(file), **result.as_dict(), "seconds": round(seconds, 3)})
