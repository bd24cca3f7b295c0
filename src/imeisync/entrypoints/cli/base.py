"""``imeisync``: the command line's root group, its context and its error handling.

The command modules import ``cli`` from here and register on it; ``imeisync.entrypoints.cli``
(the package) imports them all, so nothing imports back into the package.

Exit status (CONTRACT.md): 0 success, 1 refused by a rule, 2 bad input, 3 unavailable, 70 an
internal error (a bug). Every
refusal is one line on stderr saying what was wrong and what to do (or a JSON object on stdout
with ``--json``); a traceback is only shown with ``IMEISYNC_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import click
from sqlalchemy.exc import OperationalError

from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.domain.errors import BadInput, ImeisyncError, InternalError, Refused, Unavailable


class Context:
    """What every command gets: the parsed config (loaded lazily) and the output mode."""

    def __init__(self, config_path: str | None, as_json: bool):
        self.config_path = config_path
        self.as_json = as_json
        self._app: App | None = None

    @property
    def app(self) -> App:
        if self._app is None:
            self._app = App(load_config(self.config_path))
        return self._app

    def emit(self, human: str, data: Any) -> None:
        """Print the result: a human sentence, or the JSON document with --json."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))
        else:
            click.echo(human)

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


pass_ctx = click.make_pass_decorator(Context)


def _fail(error: ImeisyncError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"error": {
            "kind": _kind(error), "code": error.code, "message": error.message,
            "hint": error.hint, **_extra(error),
        }}, indent=2, ensure_ascii=False))
    else:
        click.echo(f"imeisync: {error}", err=True)
        for line in _detail_lines(error):
            click.echo(f"  {line}", err=True)
    sys.exit(error.exit_code)


def _kind(error: ImeisyncError) -> str:
    """One of the three ways imeisync says no, or InternalError (matching the exit code), for
    scripts; the specific reason is ``code``. Subclasses such as InvalidChecksum report their
    category."""
    for category in (BadInput, Refused, Unavailable, InternalError):
        if isinstance(error, category):
            return category.__name__
    return type(error).__name__


def _extra(error: ImeisyncError) -> dict[str, Any]:
    lines = _detail_lines(error)
    return {"details": lines} if lines else {}


def _detail_lines(error: ImeisyncError) -> list[str]:
    report = getattr(error, "report", None)
    if report is not None:
        return [str(e) for e in report.errors]
    problems = getattr(error, "problems", None)
    if problems:
        return [f"order {index + 1}: {problem}" for index, problem in problems]
    return []


class Group(click.Group):
    """The root group: turns every known failure into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        # The parsed option, not sys.argv: right in-process (CliRunner) and for "--note --json".
        as_json = bool(ctx.params.get("as_json"))
        try:
            return super().invoke(ctx)
        except ImeisyncError as error:
            _fail(error, as_json)
        except OperationalError as exc:
            from imeisync.store.db import unavailable

            _fail(unavailable(exc, "(configured database)"), as_json)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("imeisync: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("IMEISYNC_DEBUG"):
                traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0][:200]  # one line, always
            _fail(InternalError(
                f"internal error ({type(exc).__name__}: {first_line})",
                "this is a bug: run again with IMEISYNC_DEBUG=1 and report the output",
                code="internal_error",
            ), as_json)
        finally:
            obj = ctx.find_object(Context)
            if obj is not None:
                obj.close()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", default=None,
              help="Configuration file (default: $IMEISYNC_CONFIG, else ./config/imeisync.toml).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.version_option(package_name="imeisync")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """imeisync: stolen-device IMEI blocklist synchroniser."""
    ctx.obj = Context(config_path, as_json)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ImeisyncError as error:  # raised while parsing options, before invoke
        _fail(error, "--json" in sys.argv[1:])

