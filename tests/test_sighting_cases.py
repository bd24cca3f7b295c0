"""Sightings for the police case (API and service): our records only, never the IMSI in a view,
the IMSI disclosed once on a recorded court order, every refusal audited and nothing else
written, the auditor's list of disclosures, notices from other operators' networks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import delete, select

from imeisync.bootstrap import App
from imeisync.domain.roles import ROLES, Permission, allowed
from imeisync.services.liaison import Caller
from imeisync.store import models
from support.fixtures_api import Api, imei, problem, seed_foreign_record
from support.fixtures_app import Police, count
from support.sighting_rows import add_received_notice, add_sighting, track

IMSI = "240991234567890"
ORDER = {"court_order": "KBH-RET-2026-0042", "court": "Copenhagen City Court"}


def _audit(app: App, action: str) -> list[dict[str, Any]]:
    with app.db.read() as session:
        rows = session.execute(select(models.AuditEvent).where(
            models.AuditEvent.action == action).order_by(models.AuditEvent.id)).scalars().all()
        return [{"actor": r.actor, "role": r.role, "outcome": r.outcome,
                 "case_ref": r.case_ref, "imei_key": r.imei_key,
                 "detail": json.loads(r.detail)} for r in rows]


def _no_imsi_stored_in_clear(app: App) -> None:
    with app.db.read() as session:
        texts = [json.dumps([e.actor, e.detail, e.case_ref]) for e in
                 session.execute(select(models.AuditEvent)).scalars()]
    assert not any(IMSI in t for t in texts)


@pytest.fixture
def case(api: Api, police: Police) -> dict[str, Any]:
    """One of our track records with a sighting carrying an IMSI."""
    record = track(api.app, police.sign("track", imei(7), case_ref="CPH-TRACK-7"))
    return {"record": record, "sighting": add_sighting(api.app, record, imsi=IMSI)}


def test_liaison_and_auditor_see_our_sightings_without_the_subscriber(
        api: Api, case: dict[str, Any]) -> None:
    for role in ("liaison", "auditor"):
        response = api.client.get("/api/v1/sightings", headers=api.headers(role))
        assert response.status_code == 200, response.text
        assert IMSI not in response.text
        (seen,) = response.json()["sightings"]
        assert seen["sighting_id"] == case["sighting"]
        assert (seen["case_ref"], seen["node"], seen["svn"], seen["interface"],
                seen["status"], seen["subscriber"]) == (
            "CPH-TRACK-7", "10.0.0.7", "03", "n5g-eir", "GREYLISTED", "present")
        one = api.client.get(f"/api/v1/sightings/{case['sighting']}", headers=api.headers(role))
        assert one.status_code == 200 and IMSI not in one.text
        assert one.json()["history"] == []
    reads = [e["detail"]["what"] for e in _audit(api.app, "case.read")]
    assert reads.count("sightings") == 2 and reads.count("sighting") == 2


@pytest.mark.parametrize("role", [r for r in ROLES if not allowed(r, Permission.READ_CASES)])
def test_roles_without_case_access_see_no_sightings(api: Api, case: dict[str, Any],
                                                    role: str) -> None:
    problem(api.client.get("/api/v1/sightings", headers=api.headers(role)), 403, "forbidden")
    problem(api.client.get(f"/api/v1/sightings/{case['sighting']}", headers=api.headers(role)),
            403, "forbidden")


def test_sightings_filter_by_case_and_imei_and_list_notices_from_other_networks(
        api: Api, police: Police, case: dict[str, Any]) -> None:
    other = track(api.app, police.sign("track", imei(8), case_ref="CPH-TRACK-8"))
    add_sighting(api.app, other, imsi=None)
    add_received_notice(api.app, case["record"], reporter="op-se", country="SE")
    headers = api.headers("liaison")
    everything = api.client.get("/api/v1/sightings", headers=headers).json()
    assert len(everything["sightings"]) == 2
    (notice,) = everything["seen_elsewhere"]
    assert notice["text"].startswith("seen on a network of op-se (SE) at ")
    assert notice["case_ref"] == "CPH-TRACK-7"
    by_case = api.client.get("/api/v1/sightings?case_ref=CPH-TRACK-8", headers=headers).json()
    assert [s["case_ref"] for s in by_case["sightings"]] == ["CPH-TRACK-8"]
    assert by_case["seen_elsewhere"] == []
    by_imei = api.client.get(f"/api/v1/sightings?imei={imei(7)}", headers=headers).json()
    assert [s["sighting_id"] for s in by_imei["sightings"]] == [case["sighting"]]
    problem(api.client.get("/api/v1/sightings?imei=12", headers=headers), 400)
    problem(api.client.get("/api/v1/sightings?limit=x", headers=headers), 400, "malformed")


def test_a_sighting_of_another_operators_record_is_neither_listed_nor_disclosed(
        api: Api) -> None:
    key = imei(9)[:14]
    seed_foreign_record(api.app, key)
    with api.app.db.read() as session:
        record = session.execute(select(models.Record.id).where(
            models.Record.imei_key == key)).scalar_one()
    foreign = add_sighting(api.app, record, imsi=IMSI)
    headers = api.headers("liaison")
    assert api.client.get("/api/v1/sightings", headers=headers).json()["sightings"] == []
    problem(api.client.get(f"/api/v1/sightings/{foreign}", headers=headers), 422,
            "not_our_case")
    problem(api.client.post(f"/api/v1/sightings/{foreign}/disclosure", headers=headers,
                            json=ORDER), 422, "not_our_case")
    assert count(api.app, models.SightingDisclosure) == 0
    (refusal,) = _audit(api.app, "sighting.disclosure")
    assert refusal["outcome"] == "refused" and refusal["detail"]["code"] == "not_our_case"


# -- disclosure --------------------------------------------------------------------------------


def test_a_court_order_discloses_the_imsi_once_recorded_and_audited_without_it(
        api: Api, case: dict[str, Any]) -> None:
    url = f"/api/v1/sightings/{case['sighting']}/disclosure"
    response = api.client.post(url, headers=api.headers("liaison"), json=ORDER)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["imsi"] == IMSI
    assert (body["court_order"], body["court"], body["disclosed_by"]) == (
        ORDER["court_order"], ORDER["court"], "liaison-1")
    (event,) = _audit(api.app, "sighting.disclosed")
    assert (event["actor"], event["role"], event["outcome"], event["case_ref"]) == (
        "liaison-1", "liaison", "ok", "CPH-TRACK-7")
    assert event["detail"]["sighting_id"] == case["sighting"]
    assert event["detail"]["court_order"] == ORDER["court_order"]
    _no_imsi_stored_in_clear(api.app)
    # the case's history shows it; seeing the IMSI again is a second recorded disclosure
    view = api.client.get(f"/api/v1/sightings/{case['sighting']}",
                          headers=api.headers("liaison")).json()
    assert [h["court_order"] for h in view["history"]] == [ORDER["court_order"]]
    assert view["disclosures"] == 1 and IMSI not in json.dumps(view)
    device = api.client.get(f"/api/v1/devices/{imei(7)}", headers=api.headers("auditor")).json()
    (record,) = device["our_records"]  # the case's history
    assert [(d["court_order"], d["disclosed_by"]) for d in record["disclosures"]] == [
        (ORDER["court_order"], "liaison-1")]
    again = api.client.post(url, headers=api.headers("liaison"),
                            json={**ORDER, "court_order": "KBH-RET-2026-0043"})
    assert again.status_code == 201 and again.json()["imsi"] == IMSI
    assert count(api.app, models.SightingDisclosure) == 2
    assert len(_audit(api.app, "sighting.disclosed")) == 2
    assert api.app.verify_audit().ok


BAD_ORDERS = [
    ({}, "no_court_order"),
    ({"court": "Copenhagen City Court"}, "no_court_order"),
    ({"court_order": "  ", "court": "Copenhagen City Court"}, "no_court_order"),
    ({"court_order": "KBH-1"}, "no_court_order"),
    ({"court_order": "K" * 129, "court": "C"}, "malformed"),
    ({"court_order": "KBH-1\nforged line", "court": "C"}, "malformed"),
    ({"court_order": 42, "court": "C"}, "no_court_order"),
]


@pytest.mark.parametrize(("body", "code"), BAD_ORDERS)
def test_a_disclosure_without_a_valid_court_order_is_refused_audited_and_writes_nothing_else(
        api: Api, case: dict[str, Any], body: dict[str, Any], code: str) -> None:
    response = api.client.post(f"/api/v1/sightings/{case['sighting']}/disclosure",
                               headers=api.headers("liaison"), json=body)
    assert IMSI not in response.text
    problem(response, 400, code)
    assert count(api.app, models.SightingDisclosure) == 0
    (refusal,) = _audit(api.app, "sighting.disclosure")
    assert (refusal["actor"], refusal["outcome"], refusal["detail"]["code"]) == (
        "liaison-1", "refused", code)


@pytest.mark.parametrize("role", [r for r in ROLES if r != "liaison"])
def test_only_a_liaison_token_may_disclose_other_roles_are_refused_and_audited(
        api: Api, case: dict[str, Any], role: str) -> None:
    response = api.client.post(f"/api/v1/sightings/{case['sighting']}/disclosure",
                               headers=api.headers(role), json=ORDER)
    body = problem(response, 403, "forbidden")
    assert role in body["detail"] and IMSI not in response.text
    assert count(api.app, models.SightingDisclosure) == 0
    (refusal,) = _audit(api.app, "sighting.disclosure")
    assert (refusal["role"], refusal["detail"]["code"]) == (role, "forbidden")
    assert refusal["detail"]["sighting_id"] == case["sighting"]


@pytest.mark.parametrize(("imsi", "state", "code"), [
    (None, "absent", "no_imsi"), (None, "malformed", "imsi_malformed")])
def test_a_sighting_without_a_usable_imsi_has_nothing_to_disclose(
        api: Api, police: Police, imsi: str | None, state: str, code: str) -> None:
    record = track(api.app, police.sign("track", imei(11)))
    sighting = add_sighting(api.app, record, imsi=imsi, imsi_state=state)
    problem(api.client.post(f"/api/v1/sightings/{sighting}/disclosure",
                            headers=api.headers("liaison"), json=ORDER), 422, code)
    assert count(api.app, models.SightingDisclosure) == 0
    assert _audit(api.app, "sighting.disclosure")[0]["detail"]["code"] == code


def test_an_imsi_copied_from_another_sighting_does_not_decrypt_and_is_refused(
        api: Api, case: dict[str, Any]) -> None:
    other = add_sighting(api.app, case["record"], imsi="240990000000001")
    with api.app.db.write() as session:  # bound to its own sighting: a copy is unreadable
        mine = session.execute(select(models.Sighting).where(
            models.Sighting.sighting_id == case["sighting"])).scalar_one()
        theirs = session.execute(select(models.Sighting).where(
            models.Sighting.sighting_id == other)).scalar_one()
        theirs.imsi_enc = mine.imsi_enc
    response = api.client.post(f"/api/v1/sightings/{other}/disclosure",
                               headers=api.headers("liaison"), json=ORDER)
    problem(response, 422, "imsi_unreadable")
    assert IMSI not in response.text and count(api.app, models.SightingDisclosure) == 0
    assert _audit(api.app, "sighting.disclosed") == []


def test_unknown_and_purged_sightings_are_told_apart_and_refused(
        api: Api, case: dict[str, Any]) -> None:
    headers = api.headers("liaison")
    url = f"/api/v1/sightings/{case['sighting']}/disclosure"
    assert api.client.post(url, headers=headers, json=ORDER).status_code == 201
    with api.app.db.write() as session:  # the retention job's purge
        session.execute(delete(models.Sighting))
    problem(api.client.post(url, headers=headers, json=ORDER), 404, "sighting_purged")
    problem(api.client.get(f"/api/v1/sightings/{case['sighting']}", headers=headers), 404,
            "sighting_purged")
    problem(api.client.post("/api/v1/sightings/" + "f" * 32 + "/disclosure", headers=headers,
                            json=ORDER), 404, "no_sighting")
    problem(api.client.post("/api/v1/sightings/" + "x" * 500 + "/disclosure", headers=headers,
                            json=ORDER), 404, "no_sighting")
    assert count(api.app, models.SightingDisclosure) == 1  # the one before the purge
    codes = [e["detail"]["code"] for e in _audit(api.app, "sighting.disclosure")]
    assert codes == ["sighting_purged", "no_sighting", "no_sighting"]


def test_malformed_disclosure_requests_are_refused_before_anything_is_written(
        api: Api, case: dict[str, Any]) -> None:
    url = f"/api/v1/sightings/{case['sighting']}/disclosure"
    headers = api.headers("liaison")
    problem(api.client.post(url, headers=headers, content=b"{",
                            ), 415, "unsupported_media_type")
    problem(api.client.post(url, headers={**headers, "content-type": "application/json"},
                            content=b"{"), 400, "malformed_json")
    problem(api.client.post(url, headers=headers, json=[1]), 400, "malformed_json")
    problem(api.client.post(url, headers=headers, json={**ORDER, "imsi": "x"}), 400,
            "malformed")
    assert count(api.app, models.SightingDisclosure) == 0


def test_an_auditor_lists_every_disclosure_even_after_the_sighting_is_purged(
        api: Api, case: dict[str, Any]) -> None:
    api.client.post(f"/api/v1/sightings/{case['sighting']}/disclosure",
                    headers=api.headers("liaison"), json=ORDER)
    with api.app.db.write() as session:
        session.execute(delete(models.Sighting))
    response = api.client.get("/api/v1/sightings/disclosures", headers=api.headers("auditor"))
    assert response.status_code == 200, response.text
    (row,) = response.json()["disclosures"]
    assert (row["sighting_id"], row["court_order"], row["court"], row["disclosed_by"],
            row["case_ref"]) == (case["sighting"], ORDER["court_order"], ORDER["court"],
                                 "liaison-1", "CPH-TRACK-7")
    assert IMSI not in response.text and response.json()["next_after"] == row["id"]
    later = api.client.get(f"/api/v1/sightings/disclosures?after={row['id']}",
                           headers=api.headers("auditor")).json()
    assert later["disclosures"] == []
    for role in ("liaison", "network", "admin"):
        problem(api.client.get("/api/v1/sightings/disclosures", headers=api.headers(role)),
                403, "forbidden")


def test_new_sightings_count_the_last_seven_days_here_and_elsewhere(
        api: Api, police: Police, case: dict[str, Any]) -> None:
    from datetime import UTC, datetime, timedelta

    add_sighting(api.app, case["record"], seen_at=datetime.now(UTC) - timedelta(days=8))
    add_received_notice(api.app, case["record"])
    cases = api.app.sighting_cases()
    assert cases.new_count(Caller("ida", "auditor")) == 2
    assert cases.new_count(Caller("root", "admin")) == 0


# -- the command line -------------------------------------------------------------------------


def _cli(config: Any, *args: str) -> Any:
    from click.testing import CliRunner

    from imeisync.entrypoints.cli import cli

    return CliRunner().invoke(cli, ["--config", str(config), *args])


def test_the_cli_lists_shows_and_discloses_as_the_named_staff_member(
        app: App, police: Police, operator_config: Any) -> None:
    record = track(app, police.sign("track", imei(31), case_ref="CPH-CLI-31"))
    sighting = add_sighting(app, record, imsi=IMSI)
    listed = _cli(operator_config, "sighting", "list", "--as", "mette")
    assert listed.exit_code == 0, listed.output
    assert sighting in listed.output and "CPH-CLI-31" in listed.output
    assert IMSI not in listed.output
    refused = _cli(operator_config, "sighting", "disclose", sighting, "--court-order", " ",
                   "--court", "Copenhagen City Court", "--as", "mette")
    assert refused.exit_code == 2 and "court order" in refused.output
    assert IMSI not in refused.output and "Traceback" not in refused.output
    done = _cli(operator_config, "sighting", "disclose", sighting, "--court-order", "KBH-9",
                "--court", "Copenhagen City Court", "--as", "mette")
    assert done.exit_code == 0, done.output
    assert f"IMSI {IMSI}" in done.output and "recorded" in done.output
    device = _cli(operator_config, "show", imei(31))
    assert "disclosed to mette on court order KBH-9" in device.output, device.output
    shown = _cli(operator_config, "sighting", "show", sighting, "--as", "mette")
    assert "to mette on court order KBH-9" in shown.output and IMSI not in shown.output
    unknown = _cli(operator_config, "sighting", "disclose", "nope", "--court-order", "KBH-9",
                   "--court", "C")
    assert unknown.exit_code == 1 and "no sighting nope" in unknown.output
    (event,) = _audit(app, "sighting.disclosed")
    assert (event["actor"], event["detail"]["channel"]) == ("mette", "cli")
    assert [e["detail"]["code"] for e in _audit(app, "sighting.disclosure")] == [
        "no_court_order", "no_sighting"]


def test_the_cli_shows_the_alert_outbox(app: App, police: Police,
                                        operator_config: Any) -> None:
    record = track(app, police.sign("track", imei(32)))
    add_sighting(app, record, alert=True)
    shown = _cli(operator_config, "sighting", "alerts")
    assert shown.exit_code == 0, shown.output
    assert "1 pending" in shown.output and "no [sightings] webhook_url" in shown.output


# -- the console (in-process; the browser test is in test_console_browser.py) -----------------


def test_the_console_lists_sightings_counts_new_ones_and_discloses_once_on_a_court_order(
        api: Api, case: dict[str, Any]) -> None:
    csrf = api.sign_in("liaison")
    home = api.client.get("/")
    assert 'id="new-sightings">1 new' in home.text
    listed = api.client.get("/sightings")
    assert listed.status_code == 200 and "CPH-TRACK-7" in listed.text and IMSI not in listed.text
    url = f"/sightings/{case['sighting']}"
    page = api.client.get(url)
    assert "Record the court order" in page.text and IMSI not in page.text
    missing = api.client.post(url + "/disclosure", data={"csrf": csrf, "court_order": "",
                                                         "court": "Copenhagen City Court"})
    assert missing.status_code == 400 and IMSI not in missing.text
    assert "needs the court order reference" in missing.text
    done = api.client.post(url + "/disclosure", data={"csrf": csrf, **ORDER})
    assert done.status_code == 200, done.text
    assert f'id="imsi">{IMSI}<' in done.text and done.headers["cache-control"] == "no-store"
    after = api.client.get(url)
    assert IMSI not in after.text and ORDER["court_order"] in after.text
    forged = api.client.post(url + "/disclosure", data={"csrf": "x", **ORDER})
    assert forged.status_code == 403 and count(api.app, models.SightingDisclosure) == 1


def test_an_auditor_sees_sightings_in_the_console_but_cannot_disclose(
        api: Api, case: dict[str, Any]) -> None:
    csrf = api.sign_in("auditor")
    url = f"/sightings/{case['sighting']}"
    page = api.client.get(url)
    assert page.status_code == 200 and "Record the court order" not in page.text
    refused = api.client.post(url + "/disclosure", data={"csrf": csrf, **ORDER})
    assert refused.status_code == 403 and IMSI not in refused.text
    assert count(api.app, models.SightingDisclosure) == 0
    assert _audit(api.app, "sighting.disclosure")[0]["role"] == "auditor"
