"""API tokens: printed once, stored only as a hash in a 0600 file, revocable, followed by running
servers, never lost to a concurrent add; and the retention purge of notes and dispute texts."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from imeisync.adapters import tokens as tokens_module
from imeisync.adapters.tokens import TokenStore, hash_token
from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, Refused
from imeisync.entrypoints.cli import cli
from imeisync.services import audit
from imeisync.services.orders import Actor
from imeisync.services.retention import PURGED, purge
from imeisync.store import models
from support.fixtures_api import imei, seed_dispute

NO_ENV = {k: None for k in os.environ if k.startswith("IMEISYNC_")}


def run(config: Path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(config), *args], env=NO_ENV)


def test_token_add_prints_the_token_once_and_stores_only_its_hash(
        operator_config: Path, app: App) -> None:
    added = run(operator_config, "--json", "token", "add", "--name", "anna", "--role", "liaison")
    assert added.exit_code == 0, added.output
    secret = json.loads(added.output)["token"]
    assert secret.startswith("isk_") and len(secret) == 47
    path = app.config.path("api", "tokens_file")
    text = path.read_text()
    assert secret not in text and hash_token(secret) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = run(operator_config, "--json", "token", "list")
    assert secret not in listed.output and json.loads(listed.output)[0]["name"] == "anna"
    assert "isk_" not in run(operator_config, "token", "list").output
    assert app.tokens.authenticate(secret).role == "liaison"
    human = run(operator_config, "token", "add", "--name", "bo", "--role", "auditor")
    assert human.output.count("isk_") == 2  # the token, and the Authorization example
    with app.db.read() as session:
        actions = [e.action for e in session.execute(select(models.AuditEvent)).scalars()]
        assert actions == ["token.added", "token.added"]
        assert audit.verify(session).ok


def test_token_revoke_ends_it_and_bad_names_roles_and_duplicates_are_refused(
        operator_config: Path, app: App) -> None:
    secret = json.loads(run(operator_config, "--json", "token", "add", "--name", "anna",
                            "--role", "liaison").output)["token"]
    duplicate = run(operator_config, "token", "add", "--name", "anna", "--role", "admin")
    assert duplicate.exit_code == 1 and "exists already" in duplicate.output
    assert run(operator_config, "token", "add", "--name", "x", "--role", "root").exit_code == 2
    bad_name = run(operator_config, "token", "add", "--name", "a b<script>", "--role", "admin")
    assert bad_name.exit_code == 2 and "not valid" in bad_name.output
    revoked = run(operator_config, "token", "revoke", "anna")
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert app.tokens.authenticate(secret) is None
    missing = run(operator_config, "token", "revoke", "anna")
    assert missing.exit_code == 1 and "token list" in missing.output


def test_a_running_server_follows_the_file_and_keeps_the_old_set_if_it_breaks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "_CHECK_EVERY", 0.0)
    path = tmp_path / "var" / "tokens.json"
    cli_side, server = TokenStore(path), TokenStore(path)
    assert server.authenticate("isk_nothing") is None  # no file yet: nobody
    secret, _ = cli_side.add("anna", "liaison", created_by="t")
    assert server.authenticate(secret).name == "anna"
    path.write_text("{ broken")
    assert server.authenticate(secret).name == "anna"  # previous set stays in force
    with pytest.raises(BadInput):
        server.reload()
    path.unlink()
    assert server.authenticate(secret) is None  # removed file: no tokens


def test_concurrent_adds_lose_no_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    secrets: dict[str, str] = {}

    def add(n: int) -> None:
        secrets[f"p{n}"] = TokenStore(path).add(f"p{n}", "liaison", created_by="t")[0]

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = TokenStore(path)
    assert sorted(t.name for t in store.list()) == sorted(secrets)
    assert all(store.authenticate(s).name == n for n, s in secrets.items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tokens.json.")]


@pytest.mark.parametrize("presented", ["", "isk_" + "a" * 300, "isk_æøå", None])
def test_malformed_presented_tokens_are_simply_not_recognised(
        tmp_path: Path, presented: str | None) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.add("anna", "liaison", created_by="t")
    assert store.authenticate(presented) is None


def test_revoke_of_an_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Refused):
        TokenStore(tmp_path / "tokens.json").revoke("nobody")


# -- retention ---------------------------------------------------------------------------------


def test_retention_removes_notes_and_dispute_texts_of_old_closed_cases_only(app: App,
                                                                            police) -> None:
    for n in (1, 2, 3):
        app.intake().submit_unsigned({"imei": imei(n), "case_ref": f"C-{n}",
                                      "police_unit": "U", "reason": "stolen",
                                      "note": f"owner {n} phoned"}, Actor("anna"))
    app.intake().submit_signed(police.sign("lift", imei(1)), Actor("anna"))
    app.intake().submit_signed(police.sign("lift", imei(2)), Actor("anna"))
    long_ago = datetime.now(UTC) - timedelta(days=800)
    with app.db.write() as session:  # case 1 closed long ago, case 2 recently, case 3 open
        session.execute(update(models.Record).where(models.Record.imei_key == imei(1)[:14])
                        .values(closed_at=long_ago))
    seed_dispute(app, "op-se:old", imei(1)[:14], state="upheld", reason="names the owner",
                 answer_reason="theft", answered_at=long_ago)
    seed_dispute(app, "op-se:new", imei(2)[:14], state="upheld", reason="recent",
                 answer_reason="theft")
    seed_dispute(app, "op-se:open", imei(3)[:14], reason="still open")

    result = purge(app.db, 730)

    assert (result.notes, result.dispute_texts) == (1, 1)
    with app.db.read() as session:
        notes = dict(session.execute(select(models.Record.imei_key,
                                            models.Record.note_enc)).all())
        texts = {d.dispute_id: (d.reason, d.answer_reason) for d in session.execute(
            select(models.Dispute)).scalars()}
        events = session.execute(select(models.AuditEvent).where(
            models.AuditEvent.action == "retention.purged")).scalars().all()
        assert audit.verify(session).ok
        records = session.execute(select(models.Record)).scalars().all()
    assert notes[imei(1)[:14]] is None
    assert notes[imei(2)[:14]] is not None and notes[imei(3)[:14]] is not None
    assert texts == {"op-se:old": (PURGED, None), "op-se:new": ("recent", "theft"),
                     "op-se:open": ("still open", None)}
    assert sum(json.loads(e.detail).get("notes", 0) for e in events) == 1
    assert len(records) == 3 and all(r.case_ref for r in records)  # the records stay
    again = purge(app.db, 730)
    assert (again.notes, again.dispute_texts) == (0, 0)
