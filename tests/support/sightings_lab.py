"""Helpers for the sighting tests: our own records with a case, the rows the writer wrote, the
figures on ``/metrics``, and every byte the store keeps on disk (to look for IMSIs in clear)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from imeisync.store import models
from imeisync.store.db import Database
from imeisync.store.schema import ensure_schema

OPERATOR = "op-dk"  # write_eir_config's [operator] id


def seed_record(database_url: str, key: str, kind: str, *, owner: str = OPERATOR,
                case_ref: str | None = "CASE-7", last: str | None = None) -> int:
    """One open record (ours, with a police case, unless ``owner`` is another operator),
    with its change_log row; its id."""
    db = Database(database_url)
    try:
        ensure_schema(db)
        now = datetime.now(UTC)
        with db.write() as session:
            record = models.Record(
                imei_key=key, imei_key_last=last, owner_id=owner,
                owner_country="DK" if owner == OPERATOR else "SE", kind=kind, reason="stolen",
                source="order" if owner == OPERATOR else "registry",
                case_ref=case_ref if owner == OPERATOR else None, opened_at=now,
                opened_by=f"{owner}:{kind}-{time.monotonic_ns()}")
            session.add(record)
            session.add(models.ChangeLog(imei_key=key, imei_key_last=last, subject="record",
                                         op="open", kind=kind, at=now))
            session.flush()
            return int(record.id)
    finally:
        db.dispose()


def rows(database_url: str, model: type[models.Base]) -> list[Any]:
    db = Database(database_url)
    try:
        with db.read() as session:
            return list(session.execute(select(model)).scalars())
    finally:
        db.dispose()


def sightings_config(blocked_attempts: bool = False, queue_size: int = 10000,
                     dedupe: str = "15m", webhook: bool = False) -> str:
    """A ``[sightings]`` section for a test config (appended to ``write_eir_config``'s)."""
    hook = ('webhook_url = "http://127.0.0.1:9/alerts"\nwebhook_key = "alerts.pem"\n'
            if webhook else "")
    return (f'[sightings]\ndedupe = "{dedupe}"\nblocked_attempts = '
            f'{"true" if blocked_attempts else "false"}\nqueue_size = {queue_size}\n' + hook)


def figures(base_url: str, interface: str = "n5g-eir") -> dict[str, float]:
    """The sighting figures on ``/metrics``, summed over workers: outcome and drop reason
    values, ``malformed_imsi`` and ``queue_depth``."""
    text = httpx.get(base_url + "/metrics", timeout=5).text
    return figures_of(text, interface)


def figures_of(text: str, interface: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("interface") != interface:
                continue
            if sample.name == "imeisync_sightings_total":
                name = sample.labels["outcome"]
            elif sample.name == "imeisync_sightings_dropped_total":
                name = "dropped_" + sample.labels["reason"]
            elif sample.name == "imeisync_sightings_malformed_imsi_total":
                name = "malformed_imsi"
            elif sample.name == "imeisync_sightings_queue_depth":
                name = "queue_depth"
            else:
                continue
            out[name] = out.get(name, 0.0) + sample.value
    return out


def stored_bytes(folder: Path) -> bytes:
    """Every file of an SQLite store in ``folder`` (the database, its WAL and journal)."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.db*")) if p.is_file())
