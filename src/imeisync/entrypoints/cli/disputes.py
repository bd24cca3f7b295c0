"""``imeisync dispute file | list | answer``: ask another operator to review its record."""

from __future__ import annotations

from typing import Any

import click

from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.entrypoints.cli.orders import STAFF_HELP, _staff
from imeisync.services.orders import Actor


@cli.group()
def dispute() -> None:
    """Disputes: ask the owner of a record to review it; answer those about ours."""


def _line(d: dict[str, Any]) -> str:
    if d["direction"] == "filed":
        head = f"{d['dispute_id']} filed by us against {d['owner']} ({d['owner_country']})"
    else:
        head = f"{d['dispute_id']} from {d['filer']} ({d['filer_country']}) about our record"
    text = (f"{head}: IMEI key {d['imei_key']}, their case {d['case_ref']}, {d['state']}"
            f"\n    reason: {d['reason']}")
    if d["answer_reason"]:
        text += f"\n    answer: {d['state']} — {d['answer_reason']}"
    return text


@dispute.command("file")
@click.option("--imei", required=True, help="The 15-digit IMEI of the device.")
@click.option("--case", "case_ref", required=True, help="Our police case reference.")
@click.option("--reason", required=True, help="Why the record is wrong (free text).")
@click.option("--owner", default=None, help="The operator whose record it is (if several).")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def file_(ctx: Context, imei: str, case_ref: str, reason: str, owner: str | None,
          staff: str | None) -> None:
    """Ask the operator that blocked IMEI to review its record."""
    result = ctx.app.disputes().file(imei, case_ref, reason, Actor(_staff(staff)), owner)
    ctx.emit(f"dispute {result['dispute_id']} filed with {result['owner']}; its answer will "
             "arrive with `imeisync sync pull`", result)


@dispute.command("list")
@click.option("--open", "only_open", is_flag=True, help="Only disputes not yet answered.")
@click.option("--received", "direction", flag_value="received", default=None,
              help="Only disputes about our records.")
@click.option("--filed", "direction", flag_value="filed", help="Only disputes we filed.")
@pass_ctx
def list_(ctx: Context, only_open: bool, direction: str | None) -> None:
    """Disputes filed by us and received about our records."""
    rows = ctx.app.disputes().list(direction=direction, state="open" if only_open else None)
    ctx.emit("\n".join(_line(d) for d in rows) or "no disputes", rows)


@dispute.command("answer")
@click.argument("dispute_id")
@click.option("--upheld", "answer", flag_value="upheld", help="The record stands.")
@click.option("--lifted", "answer", flag_value="lifted",
              help="The record was lifted (normally answered by the lift itself).")
@click.option("--reason", required=True, help="The answer's reason, for the filer.")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def answer(ctx: Context, dispute_id: str, answer: str | None, reason: str,
           staff: str | None) -> None:
    """Answer a dispute about one of our records."""
    if answer is None:
        raise click.UsageError("say --upheld or --lifted")
    result = ctx.app.disputes().answer(dispute_id, answer, reason, Actor(_staff(staff)))
    ctx.emit(f"dispute {dispute_id} answered {answer}", result)
