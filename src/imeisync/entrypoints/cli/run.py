"""``imeisync run``: the daemon (attach check, police API and console, scheduled sync)."""

from __future__ import annotations

import sys

from imeisync.entrypoints.cli.base import Context, cli, pass_ctx


@cli.command("run")
@pass_ctx
def run(ctx: Context) -> None:
    """Run the daemon until SIGTERM or Ctrl-C: the attach check on [eir] listen, the police
    API and console on [api] listen, and the sync with the registry on its schedule.

    Under systemd (Type=notify) it reports readiness and pings the watchdog; SIGHUP reloads the
    trusted police keys and the API tokens. See the README's Operations section.
    """
    from imeisync.entrypoints.daemon.supervisor import run as run_daemon

    sys.exit(run_daemon(ctx.app.config))
