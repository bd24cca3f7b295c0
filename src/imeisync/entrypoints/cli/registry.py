"""``imeisync registry serve | upgrade``: the reference central registry."""

from __future__ import annotations

import click

from imeisync.bootstrap import upgrade_schema
from imeisync.entrypoints.cli.base import Context, cli, pass_ctx
from imeisync.registry.config import DEFAULT_REGISTRY_CONFIG, load_registry_config
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
