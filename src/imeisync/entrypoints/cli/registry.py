"""``imeisync registry serve | upgrade | canary``: the reference central registry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from imeisync.bootstrap import upgrade_schema
from imeisync.domain.errors import Unavailable
from imeisync.domain.imei import format as imei_format
from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.registry.canary_config import read_secret
from imeisync.registry.config import (
    DEFAULT_REGISTRY_CONFIG,
    RegistryConfig,
    load_registry_config,
)
from imeisync.registry.schema import upgrade

CONFIG_HELP = "The registry's configuration file (see config/registry.example.toml)."


@cli.group()
def registry() -> None:
    """The reference central registry (its own configuration and database)."""


@registry.command("serve")
@click.option("--config", "config_path", metavar="REGISTRY.toml",
              default=str(DEFAULT_REGISTRY_CONFIG), show_default=True, help=CONFIG_HELP)
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Override [server] listen.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (more than one only with PostgreSQL).")
@pass_ctx
def serve(ctx: Context, config_path: str, listen: str | None, workers: int) -> None:
    """Serve the registry protocol (docs/api/registry.yaml) until Ctrl-C."""
    from imeisync.registry.server import server

    config = load_registry_config(config_path)
    srv = server(config, workers=workers, listen=listen)
    click.echo(f"registry {config.kid} serving {len(config.members)} member(s) on "
               f"http://{listen or config.listen}", err=True)
    from imeisync.adapters.systemd import announce_http_service
    from imeisync.entrypoints.daemon.ports import probe_host, split_listen

    host, port = split_listen(listen or config.listen)  # READY=1 / WATCHDOG=1 under systemd
    host = probe_host(host)
    announce_http_service(f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz")
    from imeisync.adapters.lifecycle import DRAIN, bound_granian_shutdown, mark_granian_master

    mark_granian_master()  # its workers stop when it is gone
    bound_granian_shutdown(srv, DRAIN)  # and a worker that does not stop in time is killed
    srv.serve()


@registry.command("upgrade")
@click.option("--config", "config_path", metavar="REGISTRY.toml",
              default=str(DEFAULT_REGISTRY_CONFIG), show_default=True, help=CONFIG_HELP)
@pass_ctx
def registry_upgrade(ctx: Context, config_path: str) -> None:
    """Apply the registry database's schema migrations (take a backup first)."""
    config = load_registry_config(config_path, load_keys=False)
    before, after = upgrade_schema(config.database_url, upgrade)
    if before == after:
        ctx.emit(f"registry schema already at revision {after}", {"before": before,
                                                                   "after": after})
    else:
        ctx.emit(f"registry schema upgraded from {before or 'empty'} to {after}",
                 {"before": before, "after": after})


@registry.group("canary")
def canary() -> None:
    """Canary records: each member's own synthetic records, naming the source of a leak."""


@canary.command("identify")
@click.argument("imei")
@click.option("--config", "config_path", metavar="REGISTRY.toml",
              default=str(DEFAULT_REGISTRY_CONFIG), show_default=True, help=CONFIG_HELP)
@pass_ctx
def canary_identify(ctx: Context, imei: str, config_path: str) -> None:
    """Name the member that received the canary IMEI (exit 0); exit 1 if it is no canary,
    2 if IMEI is malformed, 3 if the registry database is unavailable."""
    from imeisync.registry.canaries import identify
    from imeisync.registry.schema import current_revision, head_revision
    from imeisync.store.db import Database

    config = _with_canary_secret(load_registry_config(config_path, load_keys=False))
    db = Database(config.database_url)
    try:
        if current_revision(db) != head_revision():
            raise Unavailable(f"the registry database {config.database_url} is not at the "
                              "current schema", "run `imeisync registry upgrade --config "
                              f"{config_path}`, or check [server] database_url")
        found = identify(db, config, imei)
    finally:
        db.dispose()
    proof = ("its serial is that draw of the member's canary key: verified" if found["verified"]
             else "not verified against the member's canary key (no [canary] secret)")
    ctx.emit(f"IMEI {imei_format(found['imei'])} is a canary planted for {found['member']} "
             f"({found['country'] or 'no longer a member'}) at {found['planted_at']}, "
             f"claiming owner {found['claimed_owner']} (draw {found['draw']}); {proof}",
             {"canary": True, **found})


@canary.command("secret")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The file to create (mode 0600; never overwritten).")
@pass_ctx
def canary_secret(ctx: Context, out: str) -> None:
    """Create the registry's canary secret ([canary] secret_file)."""
    from imeisync.registry.canary_config import new_secret

    new_secret(Path(out))
    ctx.emit(f"canary secret written to {out}; back it up with the registry's keys",
             {"secret_file": out})


def _with_canary_secret(config: RegistryConfig) -> RegistryConfig:
    """The config as loaded without keys, plus the canary secret (identify verifies with it)."""
    if config.canary is None:
        return config
    secret = read_secret(Path(config.canary.secret_file), config.source)
    return replace(config, canary=replace(config.canary, secret=secret))
