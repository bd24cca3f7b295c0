"""``imeisync order submit | block | import``: police orders from the command line."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Any

import click

from imeisync.domain.errors import BadInput
from imeisync.domain.fields import OPENING_REASONS
from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.services.imports import import_csv
from imeisync.services.orders import Actor, OrderOutcome

STAFF_HELP = "Who entered the order (recorded with it; default: the login user)."


def _staff(value: str | None) -> str:
    name = (value or getpass.getuser()).strip()
    if not name or len(name) > 128 or not name.isprintable():
        raise BadInput("--as must be a staff id of at most 128 printable characters")
    return name


def _render(ctx: Context, outcome: OrderOutcome) -> None:
    verb = "Accepted" if outcome.outcome == "accepted" else "Linked"
    ctx.emit(f"{verb}: {outcome.message} (order {outcome.order_id})", outcome.as_dict())


@cli.group()
def order() -> None:
    """Submit police orders: signed (block, track, lift), staff-entered blocks, CSV batches."""


UNKNOWN_TAC_HELP = ("Confirm an IMEI whose TAC (device model) is not in the TAC table: "
                    "checked against the police report, not mistyped.")


@order.command("submit")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@click.option("--unknown-tac-ok", is_flag=True, help=UNKNOWN_TAC_HELP)
@pass_ctx
def submit(ctx: Context, file: str, staff: str | None, unknown_tac_ok: bool) -> None:
    """Submit a police order signed as a JWS (compact form) from FILE ('-' for stdin)."""
    actor = Actor(_staff(staff), "liaison", "cli")
    token = read_token(file)
    _render(ctx, ctx.app.intake().submit_signed(token, actor, unknown_tac_ok=unknown_tac_ok))


def read_token(file: str, what: str = "signed order", limit: int = 64 * 1024) -> str:
    """A compact JWS from ``file`` ('-' for stdin): bounded, ASCII, surrounding space cut."""
    try:
        if file == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(file, "rb") as handle:
                data = handle.read(limit + 1)
    except FileNotFoundError:
        raise BadInput(f"{file}: no such file") from None
    except OSError as exc:
        raise BadInput(f"{file}: cannot be read: {exc.strerror}") from None
    if len(data) > limit:
        raise BadInput(f"{file}: larger than {limit // 1024} kB, too large for a {what}",
                       f"pass the {what} file as it was written", code="malformed_jws")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BadInput(f"{file}: a {what} is ASCII text (compact JWS); this file is not",
                       code="malformed_jws") from None


@order.command("block")
@click.option("--imei", required=True, help="The 15-digit IMEI from the police report.")
@click.option("--case", "case_ref", required=True, help="The police case reference.")
@click.option("--unit", "police_unit", required=True, help="The reporting police unit.")
@click.option("--reason", type=click.Choice(OPENING_REASONS), default="stolen", show_default=True)
@click.option("--note", default=None, help="Free text; stored encrypted.")
@click.option("--imei-last", default=None,
              help="Block the range --imei .. --imei-last (a shipment; same TAC).")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@click.option("--unknown-tac-ok", is_flag=True, help=UNKNOWN_TAC_HELP)
@pass_ctx
def block(ctx: Context, imei: str, case_ref: str, police_unit: str, reason: str,
          note: str | None, imei_last: str | None, staff: str | None,
          unknown_tac_ok: bool) -> None:
    """Block a device (or a range) from a police report, entered by liaison staff (unsigned)."""
    device: dict[str, Any] = ({"imei_range": {"first": imei, "last": imei_last}}
                              if imei_last else {"imei": imei})
    payload = {**device, "case_ref": case_ref, "police_unit": police_unit, "reason": reason}
    if note:
        payload["note"] = note
    actor = Actor(_staff(staff), "liaison", "cli")
    _render(ctx, ctx.app.intake().submit_unsigned(payload, actor, unknown_tac_ok=unknown_tac_ok))


@order.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate the whole file; apply nothing.")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@click.option("--unknown-tac-ok", is_flag=True, help=UNKNOWN_TAC_HELP)
@pass_ctx
def import_(ctx: Context, file: Path, dry_run: bool, staff: str | None,
            unknown_tac_ok: bool) -> None:
    """Import block orders from a CSV file: imei,case_ref,police_unit,reason,note (and
    optionally imei_last: the line blocks the range imei..imei_last).

    Every line is checked first; if any is bad, nothing is applied.
    """
    actor = Actor(_staff(staff), "liaison", "import")
    intake = ctx.app.intake()
    show_bar = not ctx.as_json and sys.stderr.isatty()
    with click.progressbar(length=_count_lines(file), label="importing", file=sys.stderr,
                           hidden=not show_bar) as bar:
        report = import_csv(intake, file, actor, dry_run=dry_run, progress=bar.update,
                            unknown_tac_ok=unknown_tac_ok)
    data = {"file": str(file), "lines": report.lines, "dry_run": dry_run,
            "valid_orders": len(report.orders), "accepted": report.accepted,
            "linked": report.linked}
    if dry_run:
        ctx.emit(f"{file}: {len(report.orders)} orders valid; nothing applied (dry run)", data)
    else:
        ctx.emit(f"{file}: {report.accepted} blocks accepted, {report.linked} already blocked "
                 f"by us (linked); all queued for the registry", data)


def _count_lines(file: Path) -> int:
    try:
        with open(file, "rb") as handle:
            return 2 * sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0
