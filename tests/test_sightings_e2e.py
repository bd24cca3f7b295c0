"""Issue 13 end to end, through two running daemons and a real registry on 127.0.0.1:

* op-dk tracks a phone; op-dk's own attach check sees it with a SUPI → one sighting, an alert at
  the police unit's endpoint with a valid signature and no IMSI, listed for liaison staff without
  the IMSI → a disclosure on a court order shows the IMSI once, and the audit trail records it;
* the same phone attaches on op-se's network → op-dk's case shows "seen on a network of op-se
  (SE)", its police unit gets an alert of it, and op-se stored no subscriber identity for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from imeisync.adapters.keys import generate_keypair, load_public_key
from imeisync.services.orders import Actor
from imeisync.store import models
from support.alert_receiver import Receiver
from support.daemon_harness import Daemon, daemon_config, token, wait_for
from support.eir_harness import EIC
from support.registry_lab import Lab

IMEI = "490154203237518"
IMSI = "238010123456789"
SE_IMSI = "240991234567891"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-dk", "DK"), ("op-se", "SE")])
    yield lab
    lab.close()


def _attach(daemon: Daemon, imsi: str, times: int) -> None:
    with httpx.Client(timeout=5) as client:
        for _ in range(times):
            answer = client.get(daemon.eir + EIC, params={"pei": f"imeisv-{IMEI[:14]}07",
                                                          "supi": f"imsi-{imsi}"})
            assert answer.json() == {"status": "GREYLISTED"}


def test_a_tracked_phone_is_traced_at_home_and_abroad_and_its_user_named_only_on_a_court_order(
        lab: Lab, tmp_path: Path) -> None:
    lab.start()
    alert_key, alert_pub = generate_keypair("op-dk", tmp_path / "alert-key")
    receiver = Receiver(load_public_key(alert_pub)).start()
    dk_config, dk_eir, dk_api = daemon_config(lab, "op-dk", push="1s", pull="1s", extra=(
        f'[sightings]\nwebhook_url = "{receiver.url}"\nwebhook_key = "{alert_key}"\n'))
    se_config, se_eir, se_api = daemon_config(lab, "op-se", push="1s", pull="1s")
    dk = lab.operators["op-dk"]
    outcome = dk.app.intake().submit_signed(
        lab.police_order("track", IMEI, case_ref="CPH-TRACE-1"), Actor("alice"))
    assert outcome.outcome == "accepted", outcome
    liaison = token(dk_config, "liaison-e2e", "liaison")
    auditor = token(dk_config, "auditor-e2e", "auditor")
    dk_daemon, se_daemon = Daemon(dk_config, dk_eir, dk_api), Daemon(se_config, se_eir, se_api)
    try:
        dk_daemon.start()
        se_daemon.start()

        # At home: a burst of attaches with one subscriber is one sighting and one alert.
        _attach(dk_daemon, IMSI, 20)
        wait_for(lambda: receiver.received, 30, what="the trace alert")
        alert = receiver.received[0]
        assert alert["payload"]["case_ref"] == "CPH-TRACE-1"
        assert IMSI not in alert["token"] and IMSI not in str(alert["payload"])
        sighting_id = alert["idempotency_key"]

        api = f"http://127.0.0.1:{dk_api}/api/v1/sightings"
        as_liaison = {"Authorization": f"Bearer {liaison}"}
        with httpx.Client(timeout=10) as client:
            listed = client.get(api, headers=as_liaison)
            assert listed.status_code == 200, listed.text
            sightings = listed.json()["sightings"]
            assert [s["sighting_id"] for s in sightings] == [sighting_id]
            assert IMSI not in listed.text

            refused = client.post(f"{api}/{sighting_id}/disclosure", headers=as_liaison,
                                  json={"court": "Copenhagen City Court"})
            assert refused.status_code == 400 and IMSI not in refused.text
            disclosed = client.post(f"{api}/{sighting_id}/disclosure", headers=as_liaison,
                                    json={"court_order": "KBH-2026-4411",
                                          "court": "Copenhagen City Court"})
            assert disclosed.status_code == 201, disclosed.text
            assert disclosed.json()["imsi"] == IMSI
            again = client.get(f"{api}/{sighting_id}", headers=as_liaison)
            assert again.status_code == 200 and IMSI not in again.text

            trail = client.get(f"http://127.0.0.1:{dk_api}/api/v1/audit?limit=1000",
                               headers={"Authorization": f"Bearer {auditor}"})
            assert trail.status_code == 200
            actions = [(e["action"], e["outcome"]) for e in trail.json()["events"]]
            assert ("sighting.disclosed", "ok") in actions
            assert ("sighting.disclosure", "refused") in actions
            assert IMSI not in trail.text

        # Abroad: op-se pulls op-dk's track record, then the phone attaches there.
        wait_for(lambda: se_daemon.check(IMEI) == "GREYLISTED", 30, what="the record at op-se")
        _attach(se_daemon, SE_IMSI, 5)

        def seen_elsewhere() -> list[models.SightingNotice]:
            with dk.app.db.read() as session:
                rows = session.execute(select(models.SightingNotice).where(
                    models.SightingNotice.direction == "received")).scalars().all()
                for row in rows:
                    session.expunge(row)
                return list(rows)

        wait_for(seen_elsewhere, 30, interval=0.2, what="op-se's notice at op-dk")
        [notice] = seen_elsewhere()
        assert (notice.reporter_id, notice.reporter_country) == ("op-se", "SE")
        with httpx.Client(timeout=10) as client:
            elsewhere = client.get(api, headers=as_liaison).json()["seen_elsewhere"]
        assert [e["text"].split(" at ")[0] for e in elsewhere] == [
            "seen on a network of op-se (SE)"]
        # ... and the police unit is alerted of it as of a sighting at home.
        wait_for(lambda: len(receiver.received) >= 2, 30, what="the seen-elsewhere alert")
        abroad = receiver.received[1]
        assert abroad["idempotency_key"] == notice.notice_id
        assert {k: abroad["payload"][k] for k in ("type", "case_ref", "reporter",
                                                   "reporter_country", "imei_key")} == {
            "type": "seen_elsewhere", "case_ref": "CPH-TRACE-1", "reporter": "op-se",
            "reporter_country": "SE", "imei_key": IMEI[:14]}
        assert "node" not in abroad["payload"] and SE_IMSI not in abroad["token"]
        assert dk_daemon.stop() == 0
        assert se_daemon.stop() == 0
    finally:
        dk_daemon.cleanup()
        se_daemon.cleanup()
        receiver.stop()

    se = lab.operators["op-se"]
    with se.app.db.read() as session:
        assert session.execute(select(models.Sighting)).first() is None
        sent = session.execute(select(models.SightingNotice)).scalars().all()
        assert [(n.direction, n.owner_id) for n in sent] == [("sent", "op-dk")]
    database = Path(se.app.config.database_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert SE_IMSI.encode() not in stored  # op-se kept no subscriber identity
