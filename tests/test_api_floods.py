"""The police API and console under a flood: rates per address, per token and per person for
foreign look-ups (429 with Retry-After), no database work for requests without a valid token,
and no oversized body on any route."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select
from starlette.routing import Route

from imeisync.adapters.rate_limit import RateLimiter, parse_rate
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.entrypoints.http import MAX_BODY
from imeisync.store import models
from support.fixtures_api import (
    Api,
    csrf_of,
    imei,
    make_api,
    problem,
    seed_dispute,
    seed_foreign_record,
)
from support.fixtures_app import count, write_config

# -- the limiter ------------------------------------------------------------------------------


def test_the_bucket_spends_then_refills_and_says_how_long_to_wait() -> None:
    now = [0.0]
    limiter = RateLimiter(3, 60.0, clock=lambda: now[0])  # 3 at once, then one per 20 s
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    assert limiter.take("a") == 20 and limiter.wait("a") == 20
    assert limiter.take("b") is None  # other keys are not affected
    now[0] += 15
    assert limiter.take("a") == 5  # a refusal spends nothing
    now[0] += 5
    assert limiter.wait("a") is None and limiter.take("a") is None
    assert limiter.take("a") == 20
    now[0] += 3600
    assert [limiter.take("a") for _ in range(4)] == [None, None, None, 20]  # never over 3


def test_the_limiter_holds_at_most_max_keys() -> None:
    limiter = RateLimiter(1, 3600.0, max_keys=100)
    for n in range(10_000):
        limiter.take(f"10.0.{n // 256}.{n % 256}")
    assert limiter.tracked == 100
    assert limiter.take("10.0.39.15") is not None  # the most recent keys are still counted


@pytest.mark.parametrize("text", ["", "20", "0/s", "20/d", "-1/s", "x/s", "1e3/s", 20])
def test_malformed_rates_are_refused(text: Any) -> None:
    with pytest.raises(TypeError, match="N/s"):
        parse_rate(text)


def test_the_api_rates_are_configured_in_the_api_section(tmp_path: Any,
                                                         monkeypatch: Any) -> None:
    config = load_config(write_config(tmp_path, "sqlite:///x.db"))
    assert (config.api.address_rate, config.api.token_rate,
            config.api.foreign_lookup_rate) == ("50/s", "20/s", "120/h")
    monkeypatch.setenv("IMEISYNC_API_TOKEN_RATE", "5/m")
    assert load_config(write_config(tmp_path, "sqlite:///x.db")).api.token_rate == "5/m"
    monkeypatch.setenv("IMEISYNC_API_TOKEN_RATE", "fast")
    with pytest.raises(Exception, match=r"token_rate.*N/s"):
        load_config(write_config(tmp_path, "sqlite:///x.db"))


# -- per address and per token ----------------------------------------------------------------


def test_one_address_past_its_rate_gets_429_with_retry_after_on_api_and_console(
        app: App) -> None:
    api = make_api(app, per_address=RateLimiter(3, 60.0))
    with api.client:
        for _ in range(3):
            assert api.client.get("/api/v1/orders",
                                  headers=api.headers("liaison")).status_code == 200
        refused = api.client.get("/api/v1/orders", headers=api.headers("liaison"))
        body = problem(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "20"
        assert "wait 20 seconds" in body["hint"] and "address_rate" in body["hint"]
        page = api.client.get("/signin")
        assert page.status_code == 429 and page.headers["retry-after"] == "20"
        assert "text/html" in page.headers["content-type"] and "wait 20 seconds" in page.text
        metrics = api.client.get("/metrics")
        assert metrics.status_code == 429  # every request from the address counts


def test_one_token_past_its_rate_is_refused_while_other_tokens_are_served(app: App) -> None:
    api = make_api(app, per_token=RateLimiter(2, 60.0))
    with api.client:
        for _ in range(2):
            assert api.client.get("/api/v1/orders",
                                  headers=api.headers("liaison")).status_code == 200
        body = problem(api.client.get("/api/v1/orders", headers=api.headers("liaison")), 429,
                       "rate_limited")
        assert "liaison-1" in body["detail"] and "token_rate" in body["hint"]
        assert api.client.get("/api/v1/orders", headers=api.headers("auditor")).status_code == 200


def test_a_signed_in_person_past_the_token_rate_gets_a_429_page(app: App) -> None:
    api = make_api(app, per_token=RateLimiter(2, 60.0))
    with api.client:
        api.sign_in()  # signing in is not counted; the start page it opens is (1)
        assert api.client.get("/lookup").status_code == 200  # (2)
        page = api.client.get("/orders")
        assert page.status_code == 429 and page.headers["retry-after"] == "30"
        assert "wait 30 seconds" in page.text


# -- no database work without a valid token ----------------------------------------------------


@contextlib.contextmanager
def database_checkouts(app: App) -> Iterator[list[int]]:
    """Counts connections taken from the pool (every session takes one)."""
    taken = [0]

    def checkout(*_args: Any) -> None:
        taken[0] += 1

    event.listen(app.db.engine, "checkout", checkout)
    try:
        yield taken
    finally:
        event.remove(app.db.engine, "checkout", checkout)


def _routes(api: Api) -> list[tuple[str, str]]:
    """Every method and path the [api] listener routes (path parameters filled in)."""
    found = []
    for route in api.client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Route):
            path = (route.path.replace("{order_id:path}", "ORD-1")
                    .replace("{dispute_id}", "op-se:d1").replace("{imei}", imei(1)))
            found += [(method, path) for method in sorted(route.methods or ()) if
                      method != "HEAD"]
    return found


def test_requests_without_a_valid_token_never_open_a_database_session(api: Api) -> None:
    api.client.get("/healthz")  # the pool's first connection, made before counting
    routes = [(m, p) for m, p in _routes(api) if p.startswith("/api/")]
    assert len(routes) >= 10
    with database_checkouts(api.app) as taken:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer isk_" + "x" * 43},
                            {"Authorization": "Basic Zm9vOmJhcg=="}):
                answer = api.client.request(method, path, headers=headers,
                                            content=b'{"imei": "1"}')
                problem(answer, 401)
        for path in ("/", "/orders", "/lookup?imei=" + imei(1), "/disputes"):
            assert api.client.get(path, follow_redirects=False).status_code == 303
            api.client.cookies.set("imeisync_session", "forged.cookie")
            assert api.client.get(path, follow_redirects=False).status_code == 303
            api.client.cookies.clear()
        assert api.client.post("/signin", data={"token": "isk_wrong", "csrf": "x"}
                               ).status_code == 403  # no CSRF: refused before anything
        assert taken[0] == 0
        api.client.get("/api/v1/orders", headers=api.headers("liaison"))
        assert taken[0] > 0  # the count does see a session: a valid token's request opens one


def test_an_oversized_body_is_413_on_every_route_and_writes_nothing(api: Api) -> None:
    csrf = api.sign_in()
    seed_foreign_record(api.app, imei(2)[:14])
    before = {m: count(api.app, m) for m in (models.Record, models.AuditEvent,
                                                models.Order, models.Dispute)}
    headers = {**api.headers("liaison"), "content-type": "application/json",
               "content-length": str(MAX_BODY + 1)}
    routes = _routes(api)
    assert len(routes) >= 25
    with database_checkouts(api.app) as taken:
        for method, path in routes:
            answer = api.client.request(method, path, headers=headers,
                                        content=b'{"csrf": "%s"}' % csrf.encode() + b" " * MAX_BODY)
            assert answer.status_code == 413, (method, path, answer.status_code)
            assert "too large" in answer.text
    assert taken[0] == 0
    assert {m: count(api.app, m) for m in before} == before


# -- foreign look-ups ----------------------------------------------------------------------


def _foreign_reads(app: App) -> list[models.AuditEvent]:
    with app.db.read() as session:
        return list(session.execute(select(models.AuditEvent).where(
            models.AuditEvent.action == "foreign.read").order_by(
            models.AuditEvent.id)).scalars())


def test_foreign_lookups_are_audited_each_and_limited_per_person(api: Api) -> None:
    api.app.__dict__["foreign_lookups"] = RateLimiter(2, 3600.0)  # [api] foreign_lookup_rate
    for n in (2, 3, 4):
        seed_foreign_record(api.app, imei(n)[:14], owner="op-se" if n < 4 else "op-no")
    api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(1), "case_ref": "C-1", "police_unit": "U", "reason": "stolen"})
    liaison = api.headers("liaison")
    for n in (2, 3):
        device = api.client.get(f"/api/v1/devices/{imei(n)}", headers=liaison).json()
        assert device["foreign_records"][0]["owner"] == "op-se"
    refused = api.client.get(f"/api/v1/devices/{imei(4)}", headers=liaison)
    body = problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) == 1800 and "foreign_lookup_rate" in body["hint"]
    assert "op-no" not in refused.text  # nothing of the record is shown
    # our own records, and other people, are not limited
    for _ in range(3):
        assert api.client.get(f"/api/v1/devices/{imei(1)}", headers=liaison).status_code == 200
    assert api.client.get(f"/api/v1/devices/{imei(4)}",
                          headers=api.headers("auditor")).status_code == 200
    reads = _foreign_reads(api.app)
    assert [(e.actor, e.imei_key, e.outcome) for e in reads] == [
        ("liaison-1", imei(2)[:14], "ok"), ("liaison-1", imei(3)[:14], "ok"),
        ("liaison-1", imei(4)[:14], "refused"), ("auditor-1", imei(4)[:14], "ok")]
    assert '"owners": ["op-no"]' in (reads[-1].detail or "")


def test_the_console_device_page_shares_the_foreign_lookup_limit(api: Api) -> None:
    api.app.__dict__["foreign_lookups"] = RateLimiter(1, 3600.0)
    for n in (2, 3):
        seed_foreign_record(api.app, imei(n)[:14])
    api.sign_in()
    assert api.client.get(f"/lookup?imei={imei(2)}").status_code == 200
    page = api.client.get(f"/lookup?imei={imei(3)}")
    assert page.status_code == 429 and page.headers["retry-after"] == "3600"
    assert "wait 3600 seconds" in page.text
    problem(api.client.get(f"/api/v1/devices/{imei(3)}", headers=api.headers("liaison")), 429)
    assert [e.outcome for e in _foreign_reads(api.app)] == ["ok", "refused", "refused"]


def test_list_endpoints_return_our_own_records_only(api: Api) -> None:
    foreign = [imei(n) for n in range(20, 30)]
    for text in foreign:
        seed_foreign_record(api.app, text[:14])
    seed_dispute(api.app, "op-se:d1", imei(40)[:14])
    api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(40), "case_ref": "C-1", "police_unit": "U", "reason": "stolen"})
    api.sign_in()
    answers = [api.client.get(path, headers=api.headers("liaison")) for path in (
        "/api/v1/orders?mine=false&limit=500", "/api/v1/orders", "/api/v1/disputes",
        "/orders?all=1", "/orders", "/disputes", "/")]
    assert all(a.status_code == 200 for a in answers)
    texts = [a.text.replace("-", "").replace(" ", "") for a in answers]  # IMEIs are grouped
    assert imei(40) in texts[0]  # our own record is listed
    for text in texts:
        assert not any(device[:14] in text for device in foreign)
    assert _foreign_reads(api.app) == []  # no list read counted as a foreign look-up


def test_a_console_form_is_still_read_under_its_own_limit(api: Api) -> None:
    """The middleware refuses a declared oversize body; a form within it still works."""
    csrf = api.sign_in()
    answer = api.client.post("/block", data={"csrf": csrf, "imei": imei(7), "case_ref": "C",
                                             "police_unit": "U", "reason": "stolen"},
                             follow_redirects=False)
    assert answer.status_code == 303
    assert csrf_of(api.client.get("/block").text)
