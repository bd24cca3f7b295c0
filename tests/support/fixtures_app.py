"""Application fixtures: a configured operator, its police authority, signed orders.

``operator`` builds a config file in tmp_path against ``database_url`` (so tests using it run on
SQLite and PostgreSQL), with a trusted police key; ``police.sign(...)`` makes real JWS orders.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from imeisync.adapters.keys import generate_keypair
from imeisync.adapters.police_jws import sign_order
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.store import models

_ids = itertools.count(1)


@dataclass
class Police:
    key: Path
    kid: str

    def order(self, kind: str, imei: str, /, **fields: Any) -> dict[str, Any]:
        payload = {
            "order_id": f"ORD-{next(_ids):06d}",
            "kind": kind,
            "imei": imei,
            "case_ref": "CPH-2026-118",
            "police_unit": "Copenhagen Police",
            "reason": "recovered" if kind == "lift" else "stolen",
            "issued_at": (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        payload.update(fields)
        return payload

    def sign(self, kind: str, imei: str, /, **fields: Any) -> str:
        return sign_order(self.order(kind, imei, **fields), self.key, self.kid)

    def sign_range(self, kind: str, first: str, last: str, /, **fields: Any) -> str:
        """A signed order for the IMEI range ``first``..``last`` (15-digit IMEIs)."""
        payload = self.order(kind, first, **fields)
        del payload["imei"]
        payload["imei_range"] = {"first": first, "last": last}
        return sign_order(payload, self.key, self.kid)


def write_config(folder: Path, database_url: str, *, operator_id: str = "op-dk",
                 country: str = "DK", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "police-keys").mkdir(exist_ok=True)
    path = folder / "imeisync.toml"
    path.write_text(
        f'[operator]\nid = "{operator_id}"\ncountry = "{country}"\n'
        f'[database]\nurl = "{database_url}"\n'
        f'[police]\ntrusted_keys = "{folder / "police-keys"}"\n'
        f'[security]\ndata_key_file = "{folder / "data.key"}"\n' + extra,
        encoding="utf-8",
    )
    return path


@pytest.fixture
def police(tmp_path: Path) -> Police:
    private, _public = generate_keypair("cph-police", tmp_path / "police-authority")
    return Police(private, "cph-police")


@pytest.fixture
def operator_config(tmp_path: Path, database_url: str, police: Police) -> Path:
    path = write_config(tmp_path / "operator", database_url)
    (tmp_path / "operator" / "police-keys" / "cph-police.pub").write_bytes(
        police.key.with_suffix(".pub").read_bytes()
    )
    return path


@pytest.fixture
def app(operator_config: Path) -> Iterator[App]:
    application = App(load_config(operator_config))
    yield application
    application.close()


def count(app: App, model: type[models.Base], *where: Any) -> int:
    with app.db.read() as session:
        return session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
