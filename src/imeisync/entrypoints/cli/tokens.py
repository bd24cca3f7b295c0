"""``imeisync token add | revoke | list``: API and console tokens for people and systems."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime

import click

from imeisync.domain.errors import ImeisyncError
from imeisync.domain.roles import DESCRIPTIONS, ROLES, Role
from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.services import audit


@cli.group()
def token() -> None:
    """API tokens: one per person or system, each with a role; stored only as a hash."""


def _audit(ctx: Context, action: str, name: str, role: str) -> None:
    """Token changes are admin actions: recorded in the audit trail when the store is up."""
    try:
        with ctx.app.db.write() as session:
            audit.append(session, [audit.Event(
                actor=getpass.getuser(), role="admin", action=action, outcome="ok",
                at=datetime.now(UTC), detail={"token": name, "token_role": role})])
    except ImeisyncError as exc:
        click.echo(f"imeisync: warning: not recorded in the audit trail: {exc}", err=True)


@token.command("add")
@click.option("--name", required=True, help="The person's user id or the system's name.")
@click.option("--role", required=True, type=click.Choice(ROLES),
              help="; ".join(f"{r}: {DESCRIPTIONS[Role(r)]}" for r in ROLES))
@pass_ctx
def add(ctx: Context, name: str, role: str) -> None:
    """Make a token for NAME with ROLE; it is printed once and stored only as a hash."""
    secret, info = ctx.app.tokens.add(name, role, created_by=getpass.getuser())
    _audit(ctx, "token.added", info.name, info.role)
    listen = ctx.app.config.api.listen.text
    ctx.emit(
        f"token for {info.name} (role {info.role}); shown only now, keep it safe:\n\n"
        f"    {secret}\n\n"
        f"Sign in to the web console at http://{listen}/ with it, or send it as\n"
        f"    Authorization: Bearer {secret}\n"
        f"Running servers accept it within a second. Revoke: imeisync token revoke {info.name}",
        {**info.public(), "token": secret},
    )


@token.command("revoke")
@click.argument("name")
@pass_ctx
def revoke(ctx: Context, name: str) -> None:
    """Revoke NAME's token: the API and the console refuse it within a second."""
    info = ctx.app.tokens.revoke(name)
    _audit(ctx, "token.revoked", info.name, info.role)
    ctx.emit(f"token {info.name} (role {info.role}) revoked; its console sessions end too",
             info.public())


@token.command("list")
@pass_ctx
def list_(ctx: Context) -> None:
    """Names, roles and creation times of the tokens (never the tokens themselves)."""
    rows = [t.public() for t in ctx.app.tokens.list()]
    lines = [f"{t['name']:<24} {t['role']:<8} created {t['created_at']} by {t['created_by']}"
             for t in rows]
    ctx.emit("\n".join(lines) or "no tokens (add one with `imeisync token add`)", rows)
