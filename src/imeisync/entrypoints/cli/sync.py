"""``imeisync sync push | pull | reconcile | status``: one sync step now, and how it stands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from imeisync.entrypoints.cli.base import Context, cli, pass_ctx

if TYPE_CHECKING:
    from imeisync.services.sync import SyncService


def _step(ctx: Context, run: Callable[[SyncService], Any]) -> Any:
    """Run one sync step with a service closed afterwards, and print its result."""
    service = ctx.app.sync()
    try:
        result = run(service)
    finally:
        service.close()
    ctx.emit(result.describe(), result.as_dict())
    return result


@cli.group()
def sync() -> None:
    """Synchronise with the central registry (the daemon does this on a schedule)."""


@sync.command("push")
@click.option("--batch-size", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="Changes per request.")
@pass_ctx
def push(ctx: Context, batch_size: int) -> None:
    """Send the outbox's pending changes to the registry."""
    result = _step(ctx, lambda s: s.push(batch_size=batch_size))
    if result.rejected:
        sys.exit(1)  # rejected changes mean local and central state disagree


@sync.command("pull")
@click.option("--page-size", type=click.IntRange(1, 10000), default=5000, show_default=True)
@pass_ctx
def pull(ctx: Context, page_size: int) -> None:
    """Apply the registry's feed from the stored position."""
    _step(ctx, lambda s: s.pull(page_size=page_size))


@sync.command("reconcile")
@click.option("--force", is_flag=True,
              help="Apply even if more than [sync] max_shrink of foreign records would close.")
@pass_ctx
def reconcile(ctx: Context, force: bool) -> None:
    """Compare with the registry's snapshot and repair foreign records that drifted."""
    _step(ctx, lambda s: s.reconcile(force=force))


@sync.command("status")
@pass_ctx
def status(ctx: Context) -> None:
    """Feed position, outbox depth by state, rejected changes, last success of each step."""
    from imeisync.services.operations import daemon_view

    service = ctx.app.sync()
    data = service.status()
    data.update(daemon_view(ctx.app.db, ctx.app.config.database_url))
    ctx.emit(_human(data, ctx.app.config.registry.url), data)


def _age(seconds: Any) -> str:
    if seconds is None:
        return "never"
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _human(data: dict[str, Any], url: str) -> str:
    box = data["outbox"]
    head = data["registry_head"]
    lines = [
        _headline(data),
        f"registry {url}, operator {data['operator']}",
        *_daemon_lines(data),
        f"feed position {data['cursor']}" + (f" of {head}" if head is not None else ""),
        "outbox: " + ", ".join(f"{n} {s}" for s, n in box.items())
        + f"; {data['unconfirmed']} accepted but not yet seen in the feed",
    ]
    if data["oldest_unsent_age_seconds"] is not None:
        lines.append(f"oldest unsent change queued {_age(data['oldest_unsent_age_seconds'])}")
    for step, info in data["steps"].items():
        line = f"{step}: last success {info['last_success'] or 'never'}"
        if info["last_success"]:
            line += f" ({_age(info['age_seconds'])})"
        if info["last_error"]:
            line += f"; last error {info['last_error']['at']}: {info['last_error']['error']}"
        lines.append(line)
    refused = data.get("reconcile_refused")
    if refused:
        lines.append(f"ALERT: reconcile refused at {refused['at']}: it would close "
                     f"{refused['closing']} of {refused['foreign']} foreign records "
                     f"({refused['share']:.0%} > max_shrink {refused['max_shrink']:.0%}); "
                     "`imeisync sync reconcile --force` if that is right")
    if data["rejected"]:
        lines.append(f"REJECTED by the registry ({box['rejected']}; local and central state "
                     "disagree — investigate each):")
        for r in data["rejected"]:
            lines.append(f"  {r['action']} IMEI key {r['imei_key']} order {r['order_id']}: "
                         f"{r['result_code']} {r['last_error']}")
    for o in data.get("overdue_lifts") or []:
        missing = ", ".join(f"{m['member']} ({m.get('country')}) behind since "
                            f"{m.get('behind_since')}" for m in o["missing"]) or "no receipt yet"
        lines.append(f"OVERDUE lift of order {o['order_id']} (IMEI key {o['imei_key']}, "
                     f"accepted {o['at']}): not applied by {missing}")
    notices = data.get("sighting_notices") or {}
    if notices:
        lines.append("sighting notices: " + ", ".join(  # e.g. "2 sent accepted, 1 received"
            f"{n} {k.replace('_', ' ').replace('received received', 'received')}"
            for k, n in sorted(notices.items())))
    disputes = data["disputes"]
    if disputes.get("received_open"):
        lines.append(f"{disputes['received_open']} dispute(s) about our records await an "
                     "answer: `imeisync dispute list --open`")
    return "\n".join(lines)


def _headline(data: dict[str, Any]) -> str:
    """One line that says whether anything needs a person, and what."""
    problems = []
    daemon = data.get("daemon") or {}
    if daemon.get("running") is False:
        problems.append("no daemon runs the sync (`imeisync run` / systemctl start imeisync)")
    for step in ("push", "pull"):
        error = data["steps"][step]["last_error"]
        if error:
            problems.append(f"{step} failing since {error['at']}")
    age = data.get("oldest_unsent_age_seconds")
    if age is not None and age > 600:
        problems.append(f"a change waits for the registry since {_age(age)}")
    if data["outbox"].get("rejected"):
        problems.append(f"{data['outbox']['rejected']} change(s) rejected by the registry")
    if data.get("reconcile_refused"):
        problems.append("reconcile refused by the shrink guard")
    audit = data.get("audit") or {}
    if audit and not audit.get("ok"):
        problems.append(f"audit chain broken at event {audit.get('broken_event')}")
    if (data.get("disputes") or {}).get("received_open"):
        problems.append("disputes await an answer")
    if data.get("overdue_lifts"):
        problems.append(f"{len(data['overdue_lifts'])} lift(s) not applied by every operator "
                        "within [sync] receipt_deadline")
    if not problems:
        return "state: OK"
    return "state: ATTENTION — " + "; ".join(problems)


def _daemon_lines(data: dict[str, Any]) -> list[str]:
    daemon = data.get("daemon") or {}
    lines = []
    if daemon.get("running"):
        since = f" since {daemon['since']}" if daemon.get("since") else ""
        lines.append(f"daemon: sync led by {daemon.get('node')}{since} ({daemon.get('mode')})")
    elif daemon.get("running") is False:
        lines.append(f"daemon: not running ({daemon.get('mode')}); sync only happens by hand")
    else:
        lines.append(f"daemon: unknown ({daemon.get('error', 'cannot tell')})")
    audit = data.get("audit")
    if audit:
        verdict = "intact" if audit.get("ok") else \
            f"BROKEN at event {audit.get('broken_event')}: {audit.get('problem')}"
        lines.append(f"audit chain: {verdict} ({audit.get('events')} events, verified "
                     f"{audit.get('at')})")
    return lines
