"""Fixtures for the police API and the console, in-process (Starlette's TestClient).

``api`` wraps the ``app`` fixture (so tests using it run on SQLite and PostgreSQL): a client of
``create_app(app)`` with a token for each role (``api.headers("liaison")``). Helpers seed foreign
records and disputes straight into the store, as a pull from the registry would.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from imeisync.adapters.rate_limit import RateLimiter
from imeisync.bootstrap import App
from imeisync.domain.imei import luhn_check_digit
from imeisync.domain.roles import ROLES
from imeisync.entrypoints.api import create_app
from imeisync.store import models

with warnings.catch_warnings():  # "use httpx2": the installed httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def imei(n: int, tac: str = "35209900") -> str:
    key = f"{tac}{n:06d}"
    return key + luhn_check_digit(key)


def seed_foreign_record(app: App, key: str, owner: str = "op-se", country: str = "SE") -> None:
    now = datetime.now(UTC)
    with app.db.write() as session:
        session.add(models.Record(
            imei_key=key, owner_id=owner, owner_country=country, kind="block",
            reason="stolen", source="registry", opened_at=now, opened_by=f"{owner}:c{key}",
            case_ref=None, police_unit=None))
        session.add(models.ChangeLog(imei_key=key, subject="record", op="open", kind="block",
                                     at=now))


def seed_dispute(app: App, dispute_id: str, key: str, *, direction: str = "received",
                 state: str = "open", filer: str = "op-se", owner: str | None = None,
                 case_ref: str = "STH-1", reason: str = "bought new in Stockholm",
                 answer_reason: str | None = None, filed_by: str | None = None,
                 answered_at: datetime | None = None) -> None:
    now = datetime.now(UTC)
    owner = owner or app.operator_id
    with app.db.write() as session:
        session.add(models.Dispute(
            dispute_id=dispute_id, direction=direction, imei_key=key, filer_id=filer,
            filer_country="SE" if filer == "op-se" else "DK", owner_id=owner,
            owner_country="DK" if owner == app.operator_id else "SE", case_ref=case_ref,
            reason=reason, filed_at=now, filed_by=filed_by, state=state,
            answer_reason=answer_reason, answered_at=answered_at or (
                now if state != "open" else None)))


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


@dataclass
class Api:
    app: App
    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, role: str | None, **extra: str) -> dict[str, str]:
        if role is None:
            return dict(extra)
        return {"Authorization": f"Bearer {self.tokens[role]}", **extra}

    def sign_in(self, role: str = "liaison") -> str:
        """Sign the client in to the console; returns the session's CSRF token."""
        page = self.client.get("/signin")
        answer = self.client.post("/signin", data={"csrf": csrf_of(page.text),
                                                   "token": self.tokens[role], "next": "/"},
                                  follow_redirects=False)
        assert answer.status_code == 303, answer.text
        return csrf_of(self.client.get("/").text)


def make_api(app: App, *, base_url: str = "http://testserver",
             limiter: RateLimiter | None = None, per_address: RateLimiter | None = None,
             per_token: RateLimiter | None = None) -> Api:
    """Without limiters: limits no test reaches (tests of the limits pass their own)."""
    tokens = {role: app.tokens.add(f"{role}-1", role, created_by="test")[0] for role in ROLES}
    client = TestClient(create_app(app, limiter=limiter or RateLimiter(10**6, 1.0),
                                   per_address=per_address or RateLimiter(10**6, 1.0),
                                   per_token=per_token or RateLimiter(10**6, 1.0)),
                        base_url=base_url, raise_server_exceptions=True)
    return Api(app, client, tokens)


@pytest.fixture
def api(app: App) -> Iterator[Api]:
    api = make_api(app)
    with api.client:
        yield api


def problem(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert an RFC 9457 problem+json answer; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["type"].startswith("https://")
    if code is not None:
        assert body["code"] == code, body
    return body
