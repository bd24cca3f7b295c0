"""``imeisync sighting list | show | disclose | alerts``: sightings of our tracked devices.

The CLI acts as liaison staff (``--as``, default the login user), like ``imeisync order``: its
reads append ``case.read`` and a disclosure is recorded and audited exactly as through the API.
"""

from __future__ import annotations

from typing import Any

import click

from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.entrypoints.cli.orders import STAFF_HELP, _staff
from imeisync.services.liaison import Caller
from imeisync.services.sighting_alerts import alert_status


def _caller(staff: str | None) -> Caller:
    return Caller(_staff(staff), "liaison", "cli")


def _line(s: dict[str, Any]) -> str:
    svn = f", software {s['svn']}" if s["svn"] else ""
    return (f"{s['seen_at']}  {s['sighting_id']}  IMEI {s['imei']} case {s['case_ref']}: "
            f"{s['status']} via {s['interface']} from {s['node'] or 'an unknown node'}{svn}; "
            f"subscriber {s['subscriber']}, disclosed {s['disclosures']}x")


@cli.group()
def sighting() -> None:
    """Sightings of our tracked devices; disclosure of the subscriber on a court order."""


@sighting.command("list")
@click.option("--case", "case_ref", default=None, help="Only this police case.")
@click.option("--imei", default=None, help="Only this device.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def list_(ctx: Context, case_ref: str | None, imei: str | None, limit: int,
          staff: str | None) -> None:
    """Sightings of our records, newest first (never the subscriber identity)."""
    found = ctx.app.sighting_cases().listing(_caller(staff), case_ref=case_ref, imei=imei,
                                          limit=limit)
    lines = [_line(s) for s in found["sightings"]] or ["no sightings"]
    lines += [f"IMEI {n['imei']} case {n['case_ref']}: {n['text']}"
              for n in found["seen_elsewhere"]]
    ctx.emit("\n".join(lines), found)


@sighting.command("show")
@click.argument("sighting_id")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def show(ctx: Context, sighting_id: str, staff: str | None) -> None:
    """One sighting and its disclosures."""
    view = ctx.app.sighting_cases().get(_caller(staff), sighting_id)
    lines = [_line(view)] + [
        f"  disclosed {h['disclosed_at']} to {h['disclosed_by']} on court order "
        f"{h['court_order']} ({h['court']})" for h in view["history"]]
    ctx.emit("\n".join(lines), view)


@sighting.command("disclose")
@click.argument("sighting_id")
@click.option("--court-order", required=True, metavar="REF",
              help="The court order's reference.")
@click.option("--court", required=True, metavar="NAME", help="The court that issued it.")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def disclose(ctx: Context, sighting_id: str, court_order: str, court: str,
             staff: str | None) -> None:
    """Reveal a sighting's subscriber (IMSI) on a court order: recorded, audited, shown once."""
    done = ctx.app.sighting_cases().disclose(_caller(staff), sighting_id, court_order, court)
    ctx.emit(f"IMSI {done['imsi']} (sighting {done['sighting_id']}, IMEI {done['imei']}, "
             f"case {done['case_ref']}, seen {done['seen_at']})\n"
             f"Disclosure {done['disclosure']} recorded: court order {done['court_order']} "
             f"({done['court']}) by {done['disclosed_by']}. {done['note']}", done)


@sighting.command("alerts")
@pass_ctx
def alerts(ctx: Context) -> None:
    """The alert outbox: pending, delivered, and those failing with their last error."""
    status = alert_status(ctx.app.db)
    target = ctx.app.config.sightings.webhook_url or "no [sightings] webhook_url: not sent"
    lines = [f"alerts to {target}: {status['pending']} pending (oldest "
             f"{status['oldest_pending'] or '-'}), {status['delivered']} delivered, "
             f"{status['expired']} expired (sighting purged before delivery)"]
    lines += [f"  {a['sighting_id']}: {a['attempts']} attempt(s), next {a['next_attempt_at']}: "
              f"{a['last_error']}" for a in status["failing"]]
    ctx.emit("\n".join(lines), {"webhook_url": ctx.app.config.sightings.webhook_url, **status})
