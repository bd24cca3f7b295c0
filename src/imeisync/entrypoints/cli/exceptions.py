"""``imeisync exception add | remove | list``: let one IMSI use a blocked IMEI."""

from __future__ import annotations

import click

from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.entrypoints.cli.orders import STAFF_HELP, _staff
from imeisync.services import exceptions as service
from imeisync.services.orders import Actor


@cli.group()
def exception() -> None:
    """IMEI+IMSI exceptions: the legitimate user of a cloned IMEI keeps service."""


@exception.command("add")
@click.option("--imei", required=True, help="The 15-digit IMEI (check digit validated).")
@click.option("--imsi", required=True, help="The subscriber allowed to use it (5-15 digits).")
@click.option("--case", "case_ref", required=True, help="The police case reference.")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def add(ctx: Context, imei: str, imsi: str, case_ref: str, staff: str | None) -> None:
    """Let IMSI attach with IMEI although the IMEI is blocked (audited)."""
    actor = Actor(_staff(staff), "liaison", "cli")
    view, blocked = service.add(ctx.app.db, imei=imei, imsi=imsi, case_ref=case_ref, actor=actor)
    human = (f"Exception added: IMSI {view.imsi} may use IMEI {view.imei} "
             f"(case {view.case_ref}); the attach check answers WHITELISTED for it")
    if not blocked:
        human += "\nNote: the IMEI is not blocked now; the exception matters once it is"
    ctx.emit(human, {**view.as_dict(), "imei_blocked": blocked})


@exception.command("remove")
@click.option("--imei", required=True, help="The 15-digit IMEI.")
@click.option("--imsi", required=True, help="The subscriber whose exception ends.")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def remove(ctx: Context, imei: str, imsi: str, staff: str | None) -> None:
    """End the exception of IMSI for IMEI (audited)."""
    actor = Actor(_staff(staff), "liaison", "cli")
    view = service.remove(ctx.app.db, imei=imei, imsi=imsi, actor=actor)
    ctx.emit(f"Exception removed: IMSI {view.imsi} no longer passes a block of IMEI "
             f"{view.imei} (case {view.case_ref})", view.as_dict())


@exception.command("list")
@click.option("--imei", default=None, help="Only this IMEI.")
@click.option("--all", "include_removed", is_flag=True, help="Include removed exceptions.")
@pass_ctx
def list_(ctx: Context, imei: str | None, include_removed: bool) -> None:
    """The exceptions, oldest first."""
    views = service.list_(ctx.app.db, imei=imei, include_removed=include_removed)
    if not views:
        human = "no exceptions" if include_removed else "no active exceptions"
    else:
        lines = []
        for v in views:
            line = (f"{v.imei}  IMSI {v.imsi}  case {v.case_ref}  "
                    f"since {v.created_at:%Y-%m-%d %H:%M}Z by {v.created_by}")
            if v.removed_at is not None:
                line += f"  removed {v.removed_at:%Y-%m-%d %H:%M}Z by {v.removed_by}"
            lines.append(line)
        human = "\n".join(lines)
    ctx.emit(human, [v.as_dict() for v in views])
