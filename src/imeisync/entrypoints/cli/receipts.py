"""``imeisync order status | receipt | notice``, ``imeisync receipt verify``, ``imeisync notice
apply`` and ``imeisync sync members``: every order's journey from the command line."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import click

from imeisync.adapters.files import write_atomic
from imeisync.adapters.keys import load_public_key
from imeisync.adapters.signed_documents import RECEIPT_TYP, verify_document
from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.entrypoints.cli.orders import STAFF_HELP, _staff, order, read_token
from imeisync.entrypoints.cli.sync import sync
from imeisync.services.liaison import Caller


def _caller(staff: str | None = None) -> Caller:
    return Caller(_staff(staff or getpass.getuser()), "liaison", "cli")


@order.command("status")
@click.argument("order_id")
@pass_ctx
def status(ctx: Context, order_id: str) -> None:
    """An order's progress: accepted → sent → confirmed → applied by N of M → everywhere."""
    view = ctx.app.desk().order(_caller(), order_id)
    lines = [f"order {view['order_id']} ({view['kind']} IMEI {view['imei']}): {view['state']}"]
    for step in view["steps"]:
        mark = "x" if step["done"] else " "
        extra = f" {step['count']}" if step.get("count") else ""
        lines.append(f"  [{mark}] {step['step']}{extra}" + (f" at {step['at']}"
                                                            if step.get("at") else ""))
        for m in step.get("missing") or []:
            lines.append(f"      missing {m['member']} ({m['country']}), {m['behind']} behind "
                         f"since {m['behind_since']}, last ack {m['last_ack_at'] or 'never'}")
    lines.append(f"Next step: {view['next_step']}")
    ctx.emit("\n".join(lines), view)


@order.command("receipt")
@click.argument("order_id")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the registry-signed receipt (compact JWS).")
@pass_ctx
def receipt(ctx: Context, order_id: str, out: Path) -> None:
    """Write the registry-signed receipt of an order applied by every recipient operator."""
    row = ctx.app.desk().receipt(_caller(), order_id)
    write_atomic(out, (row.jws + "\n").encode("ascii"), mode=0o644)
    ctx.emit(f"{out}: the registry-signed receipt of order {order_id}: applied by all "
             f"{row.total} recipient operator(s); check it with `imeisync receipt verify "
             f"{out}`", {"order_id": order_id, "file": str(out), "change_id": row.change_id,
                         "applied": row.applied, "total": row.total})


@cli.group("receipt")
def receipt_group() -> None:
    """Check a registry-signed apply receipt."""


@receipt_group.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--registry-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The registry's public key (PEM); default [registry] registry_public_key.")
@pass_ctx
def verify(ctx: Context, file: str, registry_key: Path | None) -> None:
    """Check a receipt offline with the registry's public key; say what it proves."""
    token = read_token(file, "receipt", 1024 * 1024)
    key_path = registry_key or Path(ctx.app.config.registry.registry_public_key)
    payload = verify_document(token, load_public_key(key_path), RECEIPT_TYP, "receipt")
    ctx.emit(_describe(payload), {"valid": True, **payload})


def _describe(p: dict[str, Any]) -> str:
    head = (f"valid: signed by registry {p.get('registry')} at {p.get('issued_at')}: change "
            f"{p.get('change_id')} ({p.get('action')} of IMEI key {p.get('imei')}) by "
            f"{p.get('owner')} ({p.get('owner_country')}), applied by {p.get('applied')} of "
            f"{p.get('total')} recipient operator(s)")
    lines = [head + ("; applied everywhere" if p.get("complete") else "; NOT complete")]
    for r in p.get("recipients") or []:
        lines.append(f"  {r.get('member')} ({r.get('country')}): "
                     + (f"applied {r.get('applied_at')}" if r.get("applied")
                        else f"not yet, behind since {r.get('behind_since')}"))
    return "\n".join(lines)


@order.command("notice")
@click.argument("order_id")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the signed lift notice (compact JWS).")
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def notice(ctx: Context, order_id: str, out: Path, staff: str | None) -> None:
    """During a registry outage: a lift notice, signed with our key, for other operators."""
    token = ctx.app.notices().issue(order_id, _staff(staff))
    write_atomic(out, (token + "\n").encode("ascii"), mode=0o644)
    ctx.emit(f"{out}: lift notice for order {order_id}; other operators apply it with "
             "`imeisync notice apply FILE`", {"order_id": order_id, "file": str(out)})


@cli.group("notice")
def notice_group() -> None:
    """Apply another operator's signed lift notice (registry outage)."""


@notice_group.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--as", "staff", metavar="STAFF", help=STAFF_HELP)
@pass_ctx
def apply(ctx: Context, file: str, staff: str | None) -> None:
    """Verify a lift notice against the member directory and close the signer's record."""
    done = ctx.app.notices().apply(read_token(file, "lift notice"), _staff(staff))
    ctx.emit(f"IMEI key {done['imei_key']}: {done['issuer']} ({done['issuer_country']})'s "
             f"record {done['state']} (notice {done['notice_id']}, order {done['order_id']})",
             done)


@sync.command("members")
@pass_ctx
def members(ctx: Context) -> None:
    """Fetch and cache the registry's signed member directory (checks lift notices)."""
    count = ctx.app.sync().members()
    ctx.emit(f"member directory cached: {count} member(s)", {"members": count})



