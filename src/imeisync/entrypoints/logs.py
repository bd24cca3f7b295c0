"""Structured logs for the daemon: one line per event, ``key=value`` or JSON (``[log] format``).

Every record becomes one line on stderr (journald under systemd takes it from there), e.g.::

    ts=2026-05-04T03:30:00.114Z level=info logger=imeisync.daemon pid=812 event=job.done
    job=push duration_ms=41 msg="push: 3 change(s) in 1 batch(es): 3 accepted, …"

Structured fields come from ``extra={"event": "job.done", "fields": {...}}`` (see ``event()``);
newlines in messages are escaped so a multi-line text stays one event.

Purpose limitation: data received from other operators serves the attach check and nothing
else, so below WARNING every run of 14 to 16 digits (an IMEI, IMEI key or IMEISV) is masked.
Warnings and errors may name an IMEI key: they concern our own records (a rejected change, a
dispute about our record), which the on-call engineer must be able to find.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from imeisync.domain.times import rfc3339_millis

_IMEI_LIKE = re.compile(r"(?<!\d)\d{14,16}(?!\d)")
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    """Log ``message`` as event ``name`` with structured ``fields``."""
    logger.log(level, message, extra={"event": name, "fields": fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ts": rfc3339_millis(record.created),
        "level": record.levelname.lower(),
        "logger": record.name,
        "pid": record.process,
    }
    name = getattr(record, "event", None)
    if name:
        data["event"] = name
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        for key, value in extra.items():
            data.setdefault(str(key), value)
    message = record.getMessage()
    if record.levelno < logging.WARNING and record.name.startswith("imeisync"):
        message = _IMEI_LIKE.sub("<imei>", message)
    data["msg"] = message
    if record.exc_info:
        data["error"] = logging.Formatter().formatException(record.exc_info)
    return data


def _kv_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str,
                                                            separators=(",", ":"))
    if text and _BARE.match(text):
        return text
    return json.dumps(text, ensure_ascii=False)  # quoted, \n and \" escaped: still one line


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… pid=… [event=…] [fields…] msg="…"`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data = _fields(record)
        message = data.pop("msg")
        error = data.pop("error", None)
        parts = [f"{key}={_kv_value(value)}" for key, value in data.items()]
        parts.append(f"msg={_kv_value(message)}")
        if error:
            parts.append(f"error={_kv_value(error)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


class _DropNoise(logging.Filter):
    """Granian's embedded server announces itself as experimental at every start; the sync
    service's own "sync <step> failed" line repeats what the daemon's job.failed event says
    (with the next run time) — one line per failure is enough at 3 a.m."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "_granian" and "experimental" in str(record.msg):
            return False
        return not (_in_daemon and record.name == "imeisync.services.sync"
                    and record.msg == "sync %s failed: %s")


_in_daemon = False


def in_daemon() -> None:
    """The daemon reports job failures itself (see ``_DropNoise``)."""
    global _in_daemon
    _in_daemon = True


def formatter_for(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else KeyValueFormatter()


def configure(fmt: str = "kv", level: str = "INFO") -> None:
    """Route every logger (ours, Granian's, APScheduler's) through one structured handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(fmt))
    handler.addFilter(_DropNoise())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if level.upper() in LEVELS else "INFO")
    # Libraries that log too much at INFO for a service's journal.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retries: the job reports the outcome
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for name in ("_granian", "granian.access", "imeisync"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def granian_log_config(fmt: str, level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for Granian's worker processes: the same one-line format
    for Granian's own messages and ours (Granian applies it in every worker it spawns)."""
    formatter = "imeisync.entrypoints.logs.JsonFormatter" if fmt == "json" else \
        "imeisync.entrypoints.logs.KeyValueFormatter"
    level = level.upper() if level.upper() in LEVELS else "INFO"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structured": {"()": formatter}},
        "filters": {"noise": {"()": "imeisync.entrypoints.logs._DropNoise"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "structured",
                                "filters": ["noise"], "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "_granian": {"handlers": [], "level": level, "propagate": True},
            "granian.access": {"handlers": [], "level": level, "propagate": True},
            "imeisync": {"handlers": [], "level": level, "propagate": True},
        },
    }
