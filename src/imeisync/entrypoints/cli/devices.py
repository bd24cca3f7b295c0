"""``imeisync check`` and ``imeisync show``: what the network and a person would see."""

from __future__ import annotations

import getpass
from typing import Any

import click

from imeisync.domain.fields import imsi as parse_imsi
from imeisync.domain.imei import parse_lookup
from imeisync.domain.verdict import network_answer
from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.services.devices import DeviceView, device_view, status_from_store
from imeisync.services.liaison import Caller


@cli.command()
@click.argument("imei")
@click.option("--imsi", default=None, help="The subscriber (IMSI), for IMEI+IMSI exceptions.")
@pass_ctx
def check(ctx: Context, imei: str, imsi: str | None) -> None:
    """The attach verdict for one device, as the network would get it."""
    device = parse_lookup(imei)
    with ctx.app.db.read() as session:
        status = status_from_store(session, device.key, parse_imsi(imsi) if imsi else None,
                                   ctx.app.config.eir.unknown_tac)
    answer = network_answer(status, ctx.app.config.eir.unknown_status)
    human = "NOT_FOUND (404 ERROR_EQUIPMENT_UNKNOWN)" if answer == "NOT_FOUND" else answer
    ctx.emit(human, {"imei_key": device.key, "imsi": imsi, "status": answer})


@cli.command()
@click.argument("imei")
@pass_ctx
def show(ctx: Context, imei: str) -> None:
    """The device's records (own and foreign), their history and what to do."""
    device = parse_lookup(imei)
    app = ctx.app
    with app.db.read() as session:
        view = device_view(session, device, app.operator_id, cipher=lambda: app.cipher)
    answer = network_answer(view.status, app.config.eir.unknown_status)
    progress = _progress(ctx, view)
    data = {**view.as_dict(), "status": answer, "progress": progress}
    ctx.emit(_human(view, answer, progress), data)


def _progress(ctx: Context, view: DeviceView) -> dict[str, dict[str, Any]]:
    """Each of our orders' journey (to "applied everywhere"), as ``order status`` shows it."""
    ids = [o["order_id"] for r in view.records if r.own for o in r.orders
           if o["outcome"] != "refused" and o["order_id"]]
    if not ids:
        return {}
    desk = ctx.app.desk()
    caller = Caller(getpass.getuser()[:128] or "cli", "liaison", "cli")
    found = {}
    for order_id in dict.fromkeys(ids):
        order = desk.order(caller, order_id)
        applied: dict[str, Any] = next(
            (s for s in order["steps"] if s["step"] == "applied"), {})
        found[order_id] = {"state": order["state"], "applied": applied.get("count"),
                           "missing": [m["member"] for m in applied.get("missing") or []]}
    return found


def _human(view: DeviceView, answer: str, progress: dict[str, dict[str, Any]]) -> str:
    lines = [f"IMEI {view.imei} (key {view.imei_key}): {answer}"]
    if view.device:
        lines.append(f"  device: {view.device}")
    if not view.records:
        lines.append("  no records")
    for r in view.records:
        state = "open" if r.closed_at is None else f"closed {r.closed_at:%Y-%m-%d %H:%M}Z"
        who = f"{r.owner_id} ({r.owner_country})" + (" — ours" if r.own else "")
        lines.append(f"  {r.kind} by {who}, reason {r.reason}, opened "
                     f"{r.opened_at:%Y-%m-%d %H:%M}Z, {state}")
        if r.imei_first:
            lines.append(f"    as part of the range {r.imei_first} … {r.imei_last}")
        if r.own:
            lines.append(f"    case {r.case_ref}, unit {r.police_unit}, order {r.opened_by}"
                         + (f", lifted by order {r.closed_by} ({r.close_reason})"
                            if r.closed_by else ""))
            if r.note:
                lines.append(f"    note: {r.note}")
            for x in r.disclosures:
                lines.append(f"    {x['disclosed_at']} subscriber of sighting {x['sighting_id']} "
                             f"disclosed to {x['disclosed_by']} on court order "
                             f"{x['court_order']} ({x['court']})")
            for o in r.orders:
                lines.append(f"    {o['received_at']} {o['kind']} {o['order_id']} "
                             f"{o['outcome']}, entered by {o['submitted_by']}"
                             + (f", signed by {o['signed_by']}" if o["signed_by"] else
                                ", unsigned"))
                journey = progress.get(o["order_id"])
                if journey:
                    lines.append(f"      progress: {journey['state']}"
                                 + (f", applied by {journey['applied']}" if journey["applied"]
                                    else "")
                                 + (f", missing {', '.join(journey['missing'])}"
                                    if journey["missing"] else ""))
    lines.append(f"Next step: {view.next_step}")
    return "\n".join(lines)
