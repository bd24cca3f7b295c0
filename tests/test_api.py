"""The police API: every endpoint × every role, problem+json errors, bad input of every kind,
data minimisation, audit of case reads, order progress, disputes, rate limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from imeisync.adapters.keys import generate_keypair
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.domain.roles import ROLES, Permission, allowed
from imeisync.entrypoints.api import MAX_BODY
from imeisync.entrypoints.http_auth import failure_limiter
from imeisync.services.orders import Actor
from imeisync.store import models
from support.fixtures_api import Api, imei, make_api, problem, seed_dispute, seed_foreign_record
from support.fixtures_app import Police, write_config

# -- every endpoint × every role ------------------------------------------------------------------


@dataclass
class World:
    api: Api
    police: Police
    order_id: str
    device: str
    open_dispute: str
    answered_dispute: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One operator (SQLite) with a token per role, one of our blocks, one foreign block and
    two disputes about our record: authorisation does not depend on the store's backend."""
    root = tmp_path_factory.mktemp("api-roles")
    private, public = generate_keypair("cph-police", root / "police")
    config = write_config(root / "op", f"sqlite:///{root / 'op.db'}")
    (root / "op" / "police-keys" / "cph-police.pub").write_bytes(public.read_bytes())
    app = App(load_config(config))
    police = Police(private, "cph-police")
    outcome = app.intake().submit_signed(police.sign("block", imei(1)), Actor("seed"))
    seed_foreign_record(app, imei(2)[:14])
    seed_dispute(app, "op-se:open", imei(1)[:14])
    seed_dispute(app, "op-se:done", imei(1)[:14], state="upheld", answer_reason="theft")
    api = make_api(app)
    with api.client:
        yield World(api, police, outcome.order_id, imei(1), "op-se:open", "op-se:done")
    app.close()


_fresh = iter(range(100, 10_000))


def _block_body() -> dict[str, Any]:
    return {"json": {"imei": imei(next(_fresh)), "case_ref": "CPH-9", "police_unit": "U1",
                     "reason": "stolen"}}


# (method, path, permission, request kwargs, status when allowed)
ENDPOINTS: list[tuple[str, str, Permission, Any, int]] = [
    ("POST", "/api/v1/orders", Permission.SUBMIT_ORDER, _block_body, 201),
    ("GET", "/api/v1/orders", Permission.READ_CASES, dict, 200),
    ("GET", "/api/v1/orders/{order_id}", Permission.READ_CASES, dict, 200),
    ("GET", "/api/v1/devices/{device}", Permission.READ_CASES, dict, 200),
    ("POST", "/api/v1/disputes", Permission.FILE_DISPUTE,  # no foreign record: refused by rule
     lambda: {"json": {"imei": imei(3), "case_ref": "STH-2", "reason": "wrong"}}, 422),
    ("GET", "/api/v1/disputes", Permission.READ_CASES, dict, 200),
    ("GET", "/api/v1/disputes/{open_dispute}", Permission.READ_CASES, dict, 200),
    ("POST", "/api/v1/disputes/{answered_dispute}/answer", Permission.ANSWER_DISPUTE,
     lambda: {"json": {"answer": "upheld", "reason": "theft confirmed"}}, 422),  # answered
    ("GET", "/api/v1/sightings", Permission.READ_CASES, dict, 200),
    ("GET", "/api/v1/sightings/disclosures", Permission.READ_AUDIT, dict, 200),
    ("POST", "/api/v1/sightings/unknown/disclosure", Permission.DISCLOSE_SUBSCRIBER,
     lambda: {"json": {"court_order": "KBH-1", "court": "City Court"}}, 404),  # no such one
    ("GET", "/api/v1/audit", Permission.READ_AUDIT, dict, 200),
    ("GET", "/api/v1/tokens", Permission.MANAGE_TOKENS, dict, 200),
]
CALLERS = [*ROLES, "no token", "unknown token"]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("method", "path", "permission", "kwargs", "ok"), ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS])
def test_every_endpoint_answers_each_role_by_the_role_table(
    world: World, caller: str, method: str, path: str, permission: Permission, kwargs: Any,
    ok: int,
) -> None:
    api = world.api
    url = path.format(order_id=world.order_id, device=world.device,
                      open_dispute=world.open_dispute, answered_dispute=world.answered_dispute)
    if caller == "no token":
        headers: dict[str, str] = {}
    elif caller == "unknown token":
        headers = {"Authorization": "Bearer isk_" + "x" * 43}
    else:
        headers = api.headers(caller)
    response = api.client.request(method, url, headers=headers, **kwargs())
    if caller == "no token":
        problem(response, 401, "no_token")
        assert response.headers["www-authenticate"].startswith("Bearer")
    elif caller == "unknown token":
        problem(response, 401, "bad_token")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    elif not allowed(caller, permission):
        body = problem(response, 403, "forbidden")
        assert caller in body["detail"]
    else:
        assert response.status_code == ok, response.text
        if ok >= 400:
            problem(response, ok)


def test_a_forbidden_role_is_refused_before_its_body_is_read(world: World) -> None:
    def chunks() -> Iterator[bytes]:  # streamed: no Content-Length to refuse it by
        yield b"x" * (MAX_BODY + 1)

    response = world.api.client.post("/api/v1/orders", content=chunks(),
                                     headers=world.api.headers("network",
                                                               **{"content-type": "text/plain"}))
    problem(response, 403, "forbidden")


def test_the_role_table_gives_no_role_more_than_its_description() -> None:
    assert {r for r in ROLES if allowed(r, Permission.SUBMIT_ORDER)} == {"liaison"}
    assert {r for r in ROLES if allowed(r, Permission.READ_NOTES)} == {"liaison", "auditor"}
    assert {r for r in ROLES if allowed(r, Permission.ATTACH_CHECK)} == {"network"}
    assert {r for r in ROLES if allowed(r, Permission.MANAGE_TOKENS)} == {"admin"}
    assert not any(allowed(r, p) for r in ("network", "admin")
                   for p in (Permission.READ_CASES, Permission.READ_NOTES))
    assert not allowed("root", Permission.READ_CASES)  # unknown roles have no rights


def test_the_openapi_document_describes_exactly_the_served_endpoints(world: World) -> None:
    import re

    from starlette.routing import Route

    document = (Path(__file__).parent.parent / "docs" / "api" / "police.yaml").read_text()
    documented = set(re.findall(r"^  (/api/v1/\S+):$", document, re.MULTILINE))
    served = {r.path.replace(":path", "") for r in world.api.client.app.routes  # type: ignore
              if isinstance(r, Route) and r.path.startswith("/api/")}
    assert documented == served


def test_unknown_paths_and_methods_answer_problem_json(world: World) -> None:
    client, headers = world.api.client, world.api.headers("liaison")
    problem(client.get("/api/v1/nothing", headers=headers), 404, "not_found")
    problem(client.delete("/api/v1/orders", headers=headers), 405, "method_not_allowed")


# -- orders ------------------------------------------------------------------------------------


def test_an_unsigned_block_is_accepted_in_the_tokens_name_and_blacklists_the_device(
        api: Api) -> None:
    response = api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": "35-209900-176148-1", "case_ref": "CPH-1", "police_unit": "U", "reason": "stolen"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/api/v1/orders/{body['order_id']}"
    assert body["outcome"] == "accepted" and body["imei_key"] == "35209900176148"
    device = api.client.get("/api/v1/devices/352099001761481", headers=api.headers("liaison"))
    assert device.json()["status"] == "BLACKLISTED"
    with api.app.db.read() as session:
        row = session.execute(select(models.Order)).scalar_one()
    assert (row.submitted_by, row.channel) == ("liaison-1", "api")


@pytest.mark.parametrize("field", ["submitted_by", "role", "actor"])
def test_a_body_naming_its_own_submitter_or_role_is_refused_identity_is_the_tokens(
        api: Api, field: str) -> None:
    response = api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(5), "case_ref": "C", "police_unit": "U", "reason": "stolen",
        field: "admin"})
    problem(response, 400, "malformed_order")


def test_a_signed_order_is_accepted_and_its_replay_is_409(api: Api, police: Police) -> None:
    token = police.sign("block", imei(6))
    headers = api.headers("liaison", **{"content-type": "application/jose"})
    first = api.client.post("/api/v1/orders", headers=headers, content=token)
    assert first.status_code == 201, first.text
    problem(api.client.post("/api/v1/orders", headers=headers, content=token), 409,
            "replayed_order_id")


def test_a_lift_of_another_operators_record_is_422_naming_it(api: Api, police: Police) -> None:
    seed_foreign_record(api.app, imei(7)[:14], "op-se", "SE")
    body = problem(api.client.post(
        "/api/v1/orders", headers=api.headers("liaison", **{"content-type": "application/jose"}),
        content=police.sign("lift", imei(7))), 422, "not_owner")
    assert "op-se (SE)" in body["detail"] and "police must ask" in body["hint"]


def test_an_unsigned_lift_is_422_signature_required(api: Api) -> None:
    problem(api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "kind": "lift", "imei": imei(8), "case_ref": "C", "police_unit": "U",
        "reason": "recovered"}), 422, "signature_required")


def test_a_bad_police_signature_is_422(api: Api, police: Police, tmp_path: Path) -> None:
    forger, _ = generate_keypair("cph-police", tmp_path / "forger")
    token = Police(forger, "cph-police").sign("block", imei(9))
    response = api.client.post("/api/v1/orders", content=token,
                               headers=api.headers("liaison",
                                                   **{"content-type": "application/jose"}))
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(("content", "code"), [
    (b"not-a-jws", "malformed_jws"),
    (b"a.b", "malformed_jws"),
    (b"!!!.???.###", "malformed_jws"),
    (b"", "malformed_jws"),
    ("\u00e6\u00f8\u00e5.x.y".encode(), "malformed_jws"),
])
def test_malformed_jws_is_400(api: Api, content: bytes, code: str) -> None:
    response = api.client.post("/api/v1/orders", content=content,
                               headers=api.headers("liaison",
                                                   **{"content-type": "application/jose"}))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] in (code, "malformed_payload")


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b"null",
                                     b'{"imei": 352099001761481}'])
def test_malformed_json_is_400(api: Api, content: bytes) -> None:
    response = api.client.post("/api/v1/orders", content=content,
                               headers=api.headers("liaison",
                                                   **{"content-type": "application/json"}))
    problem(response, 400)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x",
                                          "application/jose+json", None])
def test_wrong_content_types_are_415(api: Api, content_type: str | None) -> None:
    headers = api.headers("liaison")
    if content_type:
        headers["content-type"] = content_type
    problem(api.client.post("/api/v1/orders", headers=headers, content=b"x=1"), 415,
            "unsupported_media_type")
    problem(api.client.post("/api/v1/disputes", headers=headers, content=b"x=1"), 415,
            "unsupported_media_type")


def test_oversized_bodies_are_413_whether_declared_or_streamed(api: Api) -> None:
    headers = api.headers("liaison", **{"content-type": "application/jose"})
    problem(api.client.post("/api/v1/orders", headers=headers, content=b"a" * (MAX_BODY + 1)),
            413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"a" * 4096

    problem(api.client.post("/api/v1/orders", headers=headers, content=chunks()), 413,
            "too_large")
    json_headers = api.headers("liaison", **{"content-type": "application/json"})
    big = json.dumps({"imei": imei(1), "case_ref": "C", "reason": "x" * MAX_BODY})
    problem(api.client.post("/api/v1/disputes", headers=json_headers, content=big), 413)


def test_order_progress_accepted_sent_confirmed_or_rejected_with_what_to_do(api: Api) -> None:
    headers = api.headers("liaison")
    order_id = api.client.post("/api/v1/orders", headers=headers, json={
        "imei": imei(11), "case_ref": "C", "police_unit": "U", "reason": "lost"}
    ).json()["order_id"]

    def progress() -> dict[str, Any]:
        response = api.client.get(f"/api/v1/orders/{order_id}", headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    view = progress()
    assert view["state"] == "accepted" and view["device_status"] == "BLACKLISTED"
    assert [s["done"] for s in view["steps"]] == [True, False, False]
    assert "next sync" in view["next_step"]
    outbox = models.OutboxChange
    with api.app.db.write() as session:
        session.execute(update(outbox).values(state="sent", attempts=1, sent_at=session.execute(
            select(outbox.at)).scalar_one()))
    assert progress()["state"] == "sent"
    with api.app.db.write() as session:
        session.execute(update(outbox).values(state="accepted"))
    view = progress()
    assert view["state"] == "confirmed"  # not yet applied by the other operators
    assert [s["done"] for s in view["steps"]] == [True, True, True, False, False]
    with api.app.db.write() as session:
        session.execute(update(outbox).values(state="rejected", result_code="0002",
                                              last_error="record owned by another CNO"))
    view = progress()
    assert view["state"] == "rejected" and view["registry"]["result_code"] == "0002"
    assert "another operator owns" in view["next_step"] and "operations" in view["next_step"]


def test_a_refused_order_shows_why_and_an_unknown_order_is_404(api: Api, police: Police) -> None:
    token = police.sign("lift", imei(12), order_id="LIFT-NOTHING")
    api.client.post("/api/v1/orders", content=token,
                    headers=api.headers("liaison", **{"content-type": "application/jose"}))
    view = api.client.get("/api/v1/orders/LIFT-NOTHING", headers=api.headers("auditor")).json()
    assert view["state"] == "refused" and view["refusal"]["code"] == "no_record"
    assert view["next_step"].startswith("Not applied")
    problem(api.client.get("/api/v1/orders/NOPE", headers=api.headers("liaison")), 404,
            "no_order")


def test_order_ids_with_slashes_are_found(api: Api, police: Police) -> None:
    token = police.sign("block", imei(13), order_id="CPH/2026/7")
    api.client.post("/api/v1/orders", content=token,
                    headers=api.headers("liaison", **{"content-type": "application/jose"}))
    response = api.client.get("/api/v1/orders/CPH/2026/7", headers=api.headers("liaison"))
    assert response.json()["order_id"] == "CPH/2026/7"


def test_my_orders_lists_the_callers_own_and_all_lists_everyones(api: Api) -> None:
    api.app.intake().submit_unsigned({"imei": imei(14), "case_ref": "C", "police_unit": "U",
                                      "reason": "stolen"}, Actor("someone-else"))
    api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(15), "case_ref": "C", "police_unit": "U", "reason": "stolen"})
    mine = api.client.get("/api/v1/orders", headers=api.headers("liaison")).json()["orders"]
    assert [o["submitted_by"] for o in mine] == ["liaison-1"]
    everyone = api.client.get("/api/v1/orders?mine=false",
                              headers=api.headers("liaison")).json()["orders"]
    assert len(everyone) == 2
    problem(api.client.get("/api/v1/orders?limit=x", headers=api.headers("liaison")), 400)


# -- devices: minimal data, notes by role, audit ------------------------------------------------


def test_device_shows_foreign_records_minimised_and_our_case_details(api: Api) -> None:
    key = imei(20)[:14]
    seed_foreign_record(api.app, key, "op-se", "SE")
    api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(20), "case_ref": "CPH-20", "police_unit": "U", "reason": "stolen",
        "note": "owner called from +45 1234"})
    for role in ("liaison", "auditor"):
        view = api.client.get(f"/api/v1/devices/{imei(20)}", headers=api.headers(role)).json()
        assert view["status"] == "BLACKLISTED"
        (foreign,) = view["foreign_records"]
        assert set(foreign) == {"owner", "owner_country", "kind", "reason", "opened_at",
                                "closed_at"}
        (ours,) = view["our_records"]
        assert ours["case_ref"] == "CPH-20" and ours["note"] == "owner called from +45 1234"
        assert "op-se (SE)" in view["next_step"] and "dispute" in view["next_step"]


def test_notes_are_decrypted_only_for_roles_that_may_read_them(app: App) -> None:
    from imeisync.domain.imei import parse_typed
    from imeisync.services.devices import device_view

    app.intake().submit_unsigned({"imei": imei(21), "case_ref": "C", "police_unit": "U",
                                  "reason": "stolen", "note": "secret"}, Actor("x"))
    with app.db.read() as session:
        def note(role: str) -> str | None:
            view = device_view(session, parse_typed(imei(21)), app.operator_id,
                               cipher=lambda: app.cipher, role=role)
            return view.records[0].note

        assert [note(r) for r in ROLES] == ["secret", None, "secret", None]


@pytest.mark.parametrize("text", ["35209900176148", "imei-352099001761480",
                                  "imeisv-3520990017614801", "35 209900 176148 1"])
def test_devices_are_found_by_typed_and_network_forms(api: Api, text: str) -> None:
    response = api.client.get(f"/api/v1/devices/{text}", headers=api.headers("liaison"))
    assert response.json()["imei_key"] == "35209900176148"


@pytest.mark.parametrize("text", ["352099001761482", "12345", "abc"])
def test_a_mistyped_imei_is_400_saying_what_is_wrong(api: Api, text: str) -> None:
    body = problem(api.client.get(f"/api/v1/devices/{text}", headers=api.headers("liaison")),
                   400)
    assert "IMEI" in body["detail"]


def test_every_read_of_case_details_is_audited_with_who_and_what(api: Api) -> None:
    seed_dispute(api.app, "op-se:d", imei(22)[:14])
    api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(22), "case_ref": "CPH-22", "police_unit": "U", "reason": "stolen"})
    order_id = api.client.get("/api/v1/orders", headers=api.headers("liaison")
                              ).json()["orders"][0]["order_id"]
    reads = [("/api/v1/orders", "orders"), (f"/api/v1/orders/{order_id}", "order"),
             (f"/api/v1/devices/{imei(22)}", "device"), ("/api/v1/disputes", "disputes"),
             ("/api/v1/disputes/op-se:d", "dispute")]
    for path, _ in reads:
        assert api.client.get(path, headers=api.headers("auditor")).status_code == 200
    with api.app.db.read() as session:
        events = session.execute(select(models.AuditEvent).where(
            models.AuditEvent.action == "case.read", models.AuditEvent.actor == "auditor-1")
            .order_by(models.AuditEvent.id)).scalars().all()
    assert [json.loads(e.detail)["what"] for e in events] == [w for _, w in reads]
    assert all(e.role == "auditor" for e in events)
    device_read = events[2]
    assert (device_read.imei_key, device_read.case_ref) == (imei(22)[:14], "CPH-22")
    trail = api.client.get("/api/v1/audit?after=0&limit=1000",
                           headers=api.headers("auditor")).json()
    assert any(e["action"] == "case.read" and e["actor"] == "auditor-1"
               for e in trail["events"])
    assert trail["next_after"] == trail["events"][-1]["id"]


# -- disputes --------------------------------------------------------------------------------------


def test_disputes_are_listed_by_direction_and_answered_upheld_or_lifted(
        api: Api, police: Police) -> None:
    from support.registry_lab import InProcessRegistry

    registry = InProcessRegistry(api.app.config.base_dir / "lab",
                                 [(api.app.operator_id, "DK"), ("op-se", "SE")],
                                 f"sqlite:///{api.app.config.base_dir / 'registry.db'}")
    try:
        api.app.registry_client = lambda: registry.client(api.app.operator_id)  # type: ignore
        se = registry.client("op-se")
        for n in (30, 31):
            api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
                "imei": imei(n), "case_ref": f"CPH-{n}", "police_unit": "U", "reason": "stolen"})
        api.app.sync().push()
        for n in (30, 31):
            se.file_dispute({"dispute_id": f"op-se:{n}", "imei": imei(n)[:14],
                             "owner": api.app.operator_id, "case_ref": f"STH-{n}",
                             "reason": "bought new in Stockholm"})
        api.app.sync().pull()
        received = api.client.get("/api/v1/disputes?direction=received&state=open",
                                  headers=api.headers("liaison")).json()["disputes"]
        assert {d["dispute_id"] for d in received} == {"op-se:30", "op-se:31"}
        assert all(d["we_hold_record"] for d in received)
        upheld = api.client.post("/api/v1/disputes/op-se:30/answer",
                                 headers=api.headers("liaison"),
                                 json={"answer": "upheld", "reason": "police confirm theft"})
        assert upheld.status_code == 200 and upheld.json()["state"] == "upheld"
        problem(api.client.post("/api/v1/disputes/op-se:31/answer",
                                headers=api.headers("liaison"), json={
                                    "answer": "lifted",
                                    "order": police.sign("lift", imei(30))}), 422, "wrong_order")
        lifted = api.client.post("/api/v1/disputes/op-se:31/answer",
                                 headers=api.headers("liaison"), json={
                                     "answer": "lifted", "order": police.sign("lift", imei(31))})
        assert lifted.status_code == 201, lifted.text
        api.app.sync().push()
        api.app.sync().pull()
        states = {d["dispute_id"]: d["state"] for d in api.client.get(
            "/api/v1/disputes", headers=api.headers("auditor")).json()["disputes"]}
        assert states == {"op-se:30": "upheld", "op-se:31": "lifted"}
        problem(api.client.post("/api/v1/disputes/op-se:30/answer",
                                headers=api.headers("liaison"),
                                json={"answer": "maybe"}), 400)
    finally:
        registry.close()


def test_filing_a_dispute_on_our_own_or_an_unblocked_device_is_422(api: Api) -> None:
    api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(40), "case_ref": "C", "police_unit": "U", "reason": "stolen"})
    for n in (40, 41):
        problem(api.client.post("/api/v1/disputes", headers=api.headers("liaison"), json={
            "imei": imei(n), "case_ref": "STH", "reason": "wrong"}), 422, "nothing_to_dispute")
    problem(api.client.post("/api/v1/disputes", headers=api.headers("liaison"), json={
        "imei": imei(40), "case_ref": "STH", "reason": "wrong", "filer": "op-x"}), 400)


def test_filing_a_dispute_while_the_registry_is_down_is_503_and_nothing_is_kept(
        tmp_path: Path, sqlite_url: str) -> None:
    keys = tmp_path / "keys"
    generate_keypair("op-dk", keys)
    generate_keypair("registry", keys)
    config = write_config(tmp_path / "op", sqlite_url, extra=(
        f'[registry]\nurl = "http://127.0.0.1:1"\nsigning_key = "{keys / "op-dk.key"}"\n'
        f'kid = "op-dk"\nregistry_public_key = "{keys / "registry.pub"}"\n'))
    app = App(load_config(config))
    try:
        api = make_api(app)
        seed_foreign_record(app, imei(42)[:14])
        body = problem(api.client.post("/api/v1/disputes", headers=api.headers("liaison"), json={
            "imei": imei(42), "case_ref": "STH", "reason": "wrong"}), 503)
        assert "registry" in body["detail"]
        assert api.client.get("/api/v1/disputes", headers=api.headers("liaison")
                              ).json()["disputes"] == []
    finally:
        app.close()


# -- availability, rate limits, operations -------------------------------------------------------


def test_an_unavailable_database_is_503_with_retry_after(tmp_path: Path) -> None:
    config = write_config(tmp_path / "op",
                          "postgresql+psycopg://nobody@127.0.0.1:1/nothing?connect_timeout=2")
    down = App(load_config(config))
    api = make_api(down)
    for method, path in (("GET", "/api/v1/devices/352099001761481"),
                         ("GET", "/api/v1/orders")):
        body = problem(api.client.request(method, path, headers=api.headers("liaison")), 503)
        assert body["code"]
    response = api.client.post("/api/v1/orders", headers=api.headers("liaison"), json={
        "imei": imei(1), "case_ref": "C", "police_unit": "U", "reason": "stolen"})
    problem(response, 503)
    assert response.headers["retry-after"] == "30"
    health = api.client.get("/healthz").json()
    assert health["database"]["reachable"] is False


def test_failed_authentications_are_rate_limited_per_client_then_forgiven(app: App) -> None:
    clock = [1000.0]
    api = make_api(app, limiter=failure_limiter(3, 60, clock=lambda: clock[0]))
    bad = {"Authorization": "Bearer isk_wrong"}
    for _ in range(3):
        problem(api.client.get("/api/v1/orders", headers=bad), 401)
    throttled = problem(api.client.get("/api/v1/orders", headers=api.headers("liaison")), 429,
                        "too_many_failures")
    assert "wait" in throttled["hint"]
    assert int(api.client.get("/api/v1/orders", headers=bad).headers["retry-after"]) <= 61
    clock[0] += 61
    assert api.client.get("/api/v1/orders", headers=api.headers("liaison")).status_code == 200


def test_a_revoked_token_is_refused_at_once(api: Api) -> None:
    assert api.client.get("/api/v1/orders", headers=api.headers("liaison")).status_code == 200
    api.app.tokens.revoke("liaison-1")
    problem(api.client.get("/api/v1/orders", headers=api.headers("liaison")), 401, "bad_token")


def test_healthz_and_metrics_answer_without_a_token(api: Api) -> None:
    health = api.client.get("/healthz")
    assert health.status_code == 200 and health.json()["database"]["reachable"] is True
    api.client.get("/api/v1/orders")  # a failed authentication, counted
    metrics = api.client.get("/metrics").text
    assert "imeisync_api_requests_total" in metrics
    assert 'imeisync_api_auth_failures_total{channel="api"}' in metrics


def test_api_answers_carry_no_store_and_nosniff(api: Api) -> None:
    response = api.client.get("/api/v1/orders", headers=api.headers("liaison"))
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
