"""``imeisync keygen`` and ``imeisync police keygen | sign``: keys and signed orders."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imeisync.adapters.keys import generate_keypair
from imeisync.adapters.police_jws import sign_order
from imeisync.domain.errors import BadInput
from imeisync.entrypoints.cli.base import Context, cli, pass_ctx


def _keygen(ctx: Context, kid: str, out: Path, who: str) -> None:
    private, public = generate_keypair(kid, out)
    ctx.emit(
        f"Ed25519 key pair for {who} {kid!r}:\n  private {private} (keep secret, mode 0600)\n"
        f"  public  {public} (give this one out)",
        {"kid": kid, "private_key": str(private), "public_key": str(public)},
    )


@cli.command()
@click.option("--kid", required=True, help="Key id: the operator's or registry's name for it.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for KID.key (private) and KID.pub (public).")
@pass_ctx
def keygen(ctx: Context, kid: str, out: Path) -> None:
    """An Ed25519 key pair for an operator or the registry (PEM)."""
    _keygen(ctx, kid, out, "operator/registry")


@cli.group()
def police() -> None:
    """Tools for a police authority: make keys, sign orders."""


@police.command("keygen")
@click.option("--kid", required=True, help="Key id; operators file the public key as KID.pub.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@pass_ctx
def police_keygen(ctx: Context, kid: str, out: Path) -> None:
    """An Ed25519 key pair for a police authority."""
    _keygen(ctx, kid, out, "police authority")


@police.command("sign")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="The authority's private key (PEM).")
@click.option("--kid", required=True)
@click.option("--alg", type=click.Choice(["Ed25519", "EdDSA"]), default="Ed25519",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the signed order here instead of standard output.")
@click.argument("order_file", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def police_sign(ctx: Context, key_path: Path, kid: str, alg: str, out: Path | None,
                order_file: Path) -> None:
    """Sign ORDER.json (a police order object) as a compact JWS."""
    try:
        payload = json.loads(order_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{order_file}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{order_file}: not a JSON document ({exc})",
                       "an order is a JSON object: see the README for an example") from None
    if not isinstance(payload, dict):
        raise BadInput(f"{order_file}: an order must be a JSON object")
    token = sign_order(payload, key_path, kid, alg=alg)
    if out is None:
        click.echo(token)
    else:
        out.write_text(token + "\n", encoding="ascii")
        ctx.emit(f"signed order written to {out}", {"file": str(out), "kid": kid})
