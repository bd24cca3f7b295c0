"""The TAC table: import (all or nothing), device names, the unknown-TAC confirmation and the
attach check's [eir] unknown_tac policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from imeisync.adapters.attach_index import IndexKeeper
from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, Refused
from imeisync.domain.imei import Imei, key_to_int, parse_typed
from imeisync.domain.verdict import Status
from imeisync.entrypoints.cli import cli
from imeisync.services.devices import device_view
from imeisync.services.orders import Actor
from imeisync.services.tacs import import_tacs
from imeisync.store import models
from support.fixtures_app import Police, count

STAFF = Actor("officer-17")
HEADER = "tac,brand,model,marketing_name\n"
KNOWN = Imei("35209900176148").full  # TAC 35209900
UNKNOWN = Imei("12345678000017").full  # TAC 12345678
SAMPLE = Path(__file__).resolve().parent.parent / "config" / "tacs.sample.csv"


def tac_file(tmp_path: Path, body: str | bytes, name: str = "tacs.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return path


def load(app: App, tmp_path: Path, body: str = HEADER + "35209900,Samsung,Galaxy S24,S24\n"):
    return import_tacs(app.db, tac_file(tmp_path, body), actor="admin", now=app.clock())


def blocks(app: App, imei: str, **options: bool):
    return app.intake().submit_unsigned({"imei": imei, "case_ref": "C1", "police_unit": "U",
                                         "reason": "stolen"}, STAFF, **options)


def test_import_replaces_the_table_and_counts_the_changes(app: App, tmp_path: Path) -> None:
    first = load(app, tmp_path, HEADER + "35209900,Samsung,Galaxy S24,S24\n"
                                       "49015420,Nokia,G42,G42\n")
    second = load(app, tmp_path, HEADER + "35209900,Samsung,Galaxy S24 Ultra,S24U\n"
                                        "35417803,Apple,iPhone 15,iPhone 15\n")
    assert (first.tacs, first.added) == (2, 2)
    assert (second.tacs, second.added, second.changed, second.removed, second.unchanged) == (
        2, 1, 1, 1, 0)
    with app.db.read() as session:
        extra = session.get(models.Tac, "35417803").extra
    assert json.loads(extra) == {"marketing_name": "iPhone 15"}, "unknown columns are kept"


@pytest.mark.parametrize(("body", "words"), [
    ("imei,brand,model\n35209900,Samsung,S24\n", "header"),
    (HEADER + "35209900,Samsung,S24,x\n35209900,Samsung,S25,y\n", "appears again"),
    (HEADER + "3520990A,Samsung,S24,x\n", "not 8 digits"),
    (HEADER + "3520990,Samsung,S24,x\n", "not 8 digits"),
    (HEADER + "35209900,Samsung,S24,x\n49015420,Nok", "fields"),  # half-written
    (HEADER + "35209900,Samsung,S24," + "x" * 50_000_000 + "\n", "bytes long"),
    (HEADER, "no TACs"),
    ("", "empty"),
    (b"tac,brand,model\n35209900,Sams\xffng,S24\n", "UTF-8"),
])
def test_a_bad_tac_file_is_refused_in_one_line_and_the_old_table_stays(
    app: App, tmp_path: Path, body: str | bytes, words: str
) -> None:
    load(app, tmp_path)
    with pytest.raises(BadInput) as bad:
        import_tacs(app.db, tac_file(tmp_path, body, "bad.csv"), actor="a", now=app.clock())
    assert words in bad.value.message and "\n" not in str(bad.value)
    assert count(app, models.Tac) == 1
    with app.db.read() as session:
        assert session.get(models.Tac, "35209900") is not None


def test_cli_tac_import_of_the_sample_and_of_a_bad_file(operator_config: Path, tmp_path: Path):
    ok = CliRunner().invoke(cli, ["--config", str(operator_config), "--json", "tac", "import",
                                  str(SAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["tacs"] == 5
    bad = CliRunner().invoke(cli, ["--config", str(operator_config), "tac", "import",
                                   str(tac_file(tmp_path, "tac\n1\n"))])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_confirmations_and_show_name_the_device(app: App, tmp_path: Path) -> None:
    load(app, tmp_path)
    outcome = blocks(app, KNOWN)
    assert outcome.device == "Samsung Galaxy S24, TAC 35209900"
    assert "(Samsung Galaxy S24, TAC 35209900)" in outcome.message
    with app.db.read() as session:
        view = device_view(session, parse_typed(KNOWN), "op-dk")
    assert view.as_dict()["device"] == "Samsung Galaxy S24, TAC 35209900"


def test_unknown_tac_needs_an_explicit_confirmation_when_a_table_is_loaded(
    app: App, tmp_path: Path, police: Police
) -> None:
    assert blocks(app, UNKNOWN).outcome == "accepted", "no table: nothing to check"
    load(app, tmp_path)
    other = Imei("12345678000025").full
    with pytest.raises(Refused) as refused:
        blocks(app, other)
    assert refused.value.code == "unknown_tac" and "12345678" in refused.value.message
    with pytest.raises(Refused):
        app.intake().submit_signed(police.sign("block", other), STAFF)
    assert count(app, models.Record, models.Record.imei_key == other[:14]) == 0
    assert blocks(app, other, unknown_tac_ok=True).outcome == "accepted"
    # a lift is never held up: it closes a record that exists
    assert app.intake().submit_signed(police.sign("lift", other), STAFF).outcome == "accepted"


@pytest.mark.parametrize(("policy", "expected"), [
    ("ignore", Status.UNKNOWN), ("grey", Status.GREYLISTED), ("black", Status.BLACKLISTED)])
def test_unknown_tac_policy_at_the_attach_check_applies_only_with_a_table(
    app: App, tmp_path: Path, policy: str, expected: Status
) -> None:
    blocks(app, KNOWN)
    keeper = IndexKeeper(app.config.database_url, None, unknown_tac=policy).start(follow=False)
    try:
        index = keeper.index
        assert index is not None
        unknown_tac, known_tac = key_to_int(UNKNOWN[:14]), key_to_int("35209900999999")
        assert index.lookup(unknown_tac) is Status.UNKNOWN, "no table loaded yet"
        load(app, tmp_path)
        keeper.poll()
        assert index.lookup(unknown_tac) is expected
        assert index.lookup(known_tac) is Status.UNKNOWN
        assert index.lookup(key_to_int(KNOWN[:14])) is Status.BLACKLISTED
        health = keeper.health()
        assert (health["unknown_tac"], health["tac_table_size"]) == (policy, 1)
        assert health["unknown_tac_applied"] is (policy != "ignore")
    finally:
        keeper.stop(persist=False)


def test_api_and_console_ask_for_the_unknown_tac_confirmation_and_name_the_device(
    app: App, tmp_path: Path, police: Police
) -> None:
    from support.fixtures_api import csrf_of, make_api, problem

    load(app, tmp_path)
    api = make_api(app)
    with api.client:
        body = {"imei": UNKNOWN, "case_ref": "C", "police_unit": "U", "reason": "stolen"}
        refused = problem(api.client.post("/api/v1/orders", headers=api.headers("liaison"),
                                          json=body), 422, "unknown_tac")
        assert "12345678" in refused["detail"]
        problem(api.client.post("/api/v1/orders", headers=api.headers("liaison"),
                                json={**body, "unknown_tac_ok": "yes"}), 400, "malformed_order")
        ok = api.client.post("/api/v1/orders", headers=api.headers("liaison"),
                             json={**body, "unknown_tac_ok": True})
        assert ok.status_code == 201, ok.text
        jose = api.headers("liaison", **{"content-type": "application/jose"})
        other = Imei("12345678000025").full
        problem(api.client.post("/api/v1/orders", headers=jose,
                                content=police.sign("block", other)), 422, "unknown_tac")
        signed = api.client.post("/api/v1/orders?unknown_tac_ok=true", headers=jose,
                                 content=police.sign("block", other))
        assert signed.status_code == 201, signed.text

        named = api.client.post("/api/v1/orders", headers=api.headers("liaison"),
                                json={**body, "imei": KNOWN})
        assert named.json()["device"] == "Samsung Galaxy S24, TAC 35209900"
        device = api.client.get(f"/api/v1/devices/{KNOWN}", headers=api.headers("liaison"))
        assert device.json()["device"] == "Samsung Galaxy S24, TAC 35209900"

        csrf = api.sign_in("liaison")
        third = Imei("12345678000033").full
        form = {"csrf": csrf, "imei": third, "case_ref": "C", "police_unit": "U",
                "reason": "stolen", "note": ""}
        page = api.client.post("/block", data=form)
        assert page.status_code == 422 and "not in the TAC table" in page.text
        assert 'name="unknown_tac_ok"' in page.text
        confirmed = api.client.post("/block", data={**form, "unknown_tac_ok": "yes"},
                                    follow_redirects=False)
        assert confirmed.status_code == 303, confirmed.text
        lookup = api.client.get(f"/lookup?imei={KNOWN}")
        assert "Samsung Galaxy S24, TAC 35209900" in lookup.text
    assert csrf_of(page.text)


@pytest.mark.parametrize(("policy", "expected"),
                         [("ignore", "WHITELISTED"), ("black", "BLACKLISTED")])
def test_check_on_the_command_line_applies_the_unknown_tac_policy_like_the_network(
    app: App, tmp_path: Path, operator_config: Path, policy: str, expected: str
) -> None:
    load(app, tmp_path)
    config = operator_config.read_text().replace("[eir]\n", "")
    operator_config.write_text(config + f'\n[eir]\nunknown_tac = "{policy}"\n')
    out = CliRunner().invoke(cli, ["--config", str(operator_config), "--json", "check", UNKNOWN])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["status"] == expected
    known = CliRunner().invoke(cli, ["--config", str(operator_config), "--json", "check", KNOWN])
    assert json.loads(known.output)["status"] == "WHITELISTED"
