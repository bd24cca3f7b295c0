"""The web console's templates (Jinja2, always autoescaped) and static files (CSS only).

The pages work without JavaScript and there is none: forms post, the server answers with a
page or a redirect. Every value that came from a person or another operator is escaped by
Jinja's autoescape; nothing is marked ``|safe``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def when(value: str | datetime | None) -> str:
    """``2026-11-21T10:00:00Z`` → ``2026-11-21 10:00 UTC`` (empty for None)."""
    if not value:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")
    return value.replace("T", " ")[:16] + " UTC"


def urlpart(value: str) -> str:
    """One path segment, percent-encoded (dispute ids carry ':' and order ids may carry '/')."""
    return quote(str(value), safe="")


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = when
    env.filters["urlpart"] = urlpart
    return env
