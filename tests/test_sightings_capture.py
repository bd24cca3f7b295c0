"""Sightings captured by the attach check: a real Granian server on loopback, a real store.

A tracked device checked a hundred times with one subscriber is one sighting, its IMSI only
encrypted; another operator's tracked device is one notice without subscriber; untracked and
(by default) blocked devices are nothing; a flood, a full queue or a locked store never changes
an answer; what is dropped or malformed is counted on /metrics.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imeisync.adapters.data_crypto import DataCipher
from imeisync.store import models
from support.eir_harness import EIC, EirServer, free_port, wait_for, write_eir_config
from support.sightings_lab import (
    figures,
    rows,
    seed_record,
    sightings_config,
    stored_bytes,
)

TRACKED = "49015420323751"
FOREIGN_TRACKED = "35209900176148"
BLOCKED = "35417803685978"
UNTRACKED = "01234567890123"
RANGE_FIRST, RANGE_INSIDE, RANGE_LAST = "35686800004100", "35686800004141", "35686800004199"
IMSI = "238010123456789"


class Lab:
    def __init__(self, folder: Path, blocked_attempts: bool = False, queue_size: int = 10000,
                 webhook: bool = False):
        self.folder = folder
        self.url = f"sqlite:///{folder / 'imeisync.db'}"
        self.track_id = seed_record(self.url, TRACKED, "track")
        seed_record(self.url, FOREIGN_TRACKED, "track", owner="op-se")
        self.block_id = seed_record(self.url, BLOCKED, "block")
        self.range_id = seed_record(self.url, RANGE_FIRST, "track", last=RANGE_LAST,
                                    case_ref="CASE-RANGE")
        port = free_port()
        config = write_eir_config(folder, self.url, port=port)
        config.write_text(config.read_text() + sightings_config(
            blocked_attempts=blocked_attempts, queue_size=queue_size, webhook=webhook))
        self.server = EirServer(config, port)
        self.client = httpx.Client(timeout=10, http2=True)

    def check(self, pei: str, supi: str | None = None) -> str:
        params = {"pei": pei} if supi is None else {"pei": pei, "supi": supi}
        response = self.client.get(self.server.url + EIC, params=params)
        assert response.status_code == 200, response.text
        return str(response.json()["status"])

    def sightings(self) -> list[models.Sighting]:
        return rows(self.url, models.Sighting)

    def notices(self) -> list[models.SightingNotice]:
        return rows(self.url, models.SightingNotice)

    def settled(self, **expected: float) -> dict[str, float]:
        """The figures once the writer caught up with ``expected``."""
        found: dict[str, float] = {}

        def reached() -> bool:
            found.update(figures(self.server.url))
            return all(found.get(k, 0) >= v for k, v in expected.items()) and not found.get(
                "queue_depth")

        wait_for(reached, 15, 0.1)
        return found

    def cipher(self) -> DataCipher:
        return DataCipher.from_key_file(self.folder / "data.key", create=False)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    with lab.server:
        yield lab
    lab.client.close()


def test_a_tracked_device_checked_a_hundred_times_is_one_sighting_with_the_imsi_encrypted(
        lab: Lab) -> None:
    for _ in range(100):
        assert lab.check(f"imeisv-{TRACKED}07", f"imsi-{IMSI}") == "GREYLISTED"

    found = lab.settled(recorded=1, deduplicated=99)

    assert found["recorded"] == 1 and found["deduplicated"] == 99 and found["dropped"] == 0
    [sighting] = lab.sightings()
    assert (sighting.imei_key, sighting.svn, sighting.interface, sighting.status) == (
        TRACKED, "07", "n5g-eir", "GREYLISTED")
    assert sighting.node == "127.0.0.1"
    assert (sighting.record_id, sighting.case_ref) == (lab.track_id, "CASE-7")
    assert sighting.imsi_state == "present"
    assert IMSI not in sighting.imsi_enc and IMSI not in (sighting.imsi_digest or "")
    assert lab.cipher().decrypt(sighting.imsi_enc, context=f"sighting:{sighting.sighting_id}"
                                ) == IMSI
    with pytest.raises(Exception, match="cannot be decrypted"):
        lab.cipher().decrypt(sighting.imsi_enc, context="sighting:another")
    assert IMSI.encode() not in stored_bytes(lab.folder)
    assert rows(lab.url, models.SightingAlert) == []  # no webhook configured: no outbox rows


def test_another_subscriber_on_the_same_device_is_another_sighting(lab: Lab) -> None:
    for imsi in (IMSI, "238010000000002", IMSI):
        assert lab.check(f"imei-{TRACKED}", f"imsi-{imsi}") == "GREYLISTED"
    assert lab.check(f"imei-{TRACKED}") == "GREYLISTED"

    lab.settled(recorded=3)

    found = sorted((s.imsi_state, s.svn or "") for s in lab.sightings())
    assert found == [("absent", ""), ("present", ""), ("present", "")]
    digests = {s.imsi_digest for s in lab.sightings() if s.imsi_state == "present"}
    assert len(digests) == 2


def test_another_operators_tracked_device_is_one_sent_notice_without_subscriber(
        lab: Lab) -> None:
    for _ in range(20):
        assert lab.check(f"imeisv-{FOREIGN_TRACKED}03", f"imsi-{IMSI}") == "GREYLISTED"

    lab.settled(noticed=1, deduplicated=19)

    assert lab.sightings() == []
    [notice] = lab.notices()
    assert (notice.direction, notice.state, notice.imei_key, notice.owner_id,
            notice.reporter_id, notice.reporter_country, notice.record_id) == (
        "sent", "pending", FOREIGN_TRACKED, "op-se", "op-dk", "DK", None)
    assert IMSI.encode() not in stored_bytes(lab.folder)


def test_untracked_and_blocked_devices_are_not_sightings_by_default(lab: Lab) -> None:
    assert lab.check(f"imei-{UNTRACKED}", f"imsi-{IMSI}") == "WHITELISTED"
    assert lab.check(f"imei-{BLOCKED}", f"imsi-{IMSI}") == "BLACKLISTED"
    assert lab.check(f"imei-{TRACKED}", f"imsi-{IMSI}") == "GREYLISTED"  # a marker

    lab.settled(recorded=1)

    assert [s.imei_key for s in lab.sightings()] == [TRACKED]
    assert lab.notices() == []


def test_a_device_inside_a_tracked_range_is_a_sighting_of_the_range_record(lab: Lab) -> None:
    assert lab.check(f"imei-{RANGE_INSIDE}", f"imsi-{IMSI}") == "GREYLISTED"

    lab.settled(recorded=1)

    [sighting] = lab.sightings()
    assert (sighting.imei_key, sighting.record_id, sighting.case_ref) == (
        RANGE_INSIDE, lab.range_id, "CASE-RANGE")


def test_a_malformed_imsi_is_stored_without_it_and_counted(lab: Lab) -> None:
    # imsi-12345 passes TS 29.571's pattern (the answer is a verdict) but is no IMSI: no MSIN.
    assert lab.check(f"imei-{TRACKED}", "imsi-12345") == "GREYLISTED"
    assert lab.check(f"imei-{RANGE_INSIDE}", "nai-someone@example.org") == "GREYLISTED"

    found = lab.settled(recorded=2)

    assert found["malformed_imsi"] == 1
    states = {s.imei_key: (s.imsi_state, s.imsi_enc, s.imsi_digest) for s in lab.sightings()}
    assert states == {TRACKED: ("malformed", None, None), RANGE_INSIDE: ("absent", None, None)}
    assert b"12345" not in stored_bytes(lab.folder).replace(b"012345", b"")


def test_blocked_attempts_records_our_blocked_device_and_writes_alerts_only_for_tracks(
        tmp_path: Path) -> None:
    lab = Lab(tmp_path, blocked_attempts=True, webhook=True)
    with lab.server:
        assert lab.check(f"imeisv-{BLOCKED}11", f"imsi-{IMSI}") == "BLACKLISTED"
        assert lab.check(f"imeisv-{TRACKED}12", f"imsi-{IMSI}") == "GREYLISTED"
        lab.settled(recorded=2)
    lab.client.close()

    by_key = {s.imei_key: s for s in lab.sightings()}
    assert (by_key[BLOCKED].status, by_key[BLOCKED].record_id, by_key[BLOCKED].svn) == (
        "BLACKLISTED", lab.block_id, "11")
    [alert] = rows(lab.url, models.SightingAlert)
    assert (alert.sighting_id, alert.state, alert.attempts) == (
        by_key[TRACKED].sighting_id, "pending", 0)


def test_a_full_queue_drops_and_counts_while_every_answer_stays_right(tmp_path: Path) -> None:
    lab = Lab(tmp_path, queue_size=5)
    with lab.server:
        blocker = sqlite3.connect(tmp_path / "imeisync.db", timeout=1, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the store's write lock held: the writer waits
        try:
            assert lab.check(f"imei-{TRACKED}", "imsi-238010000000999") == "GREYLISTED"
            time.sleep(1.0)  # the writer took that one and waits for the lock with it
            answers = [lab.check(f"imei-{key}", f"imsi-2380100000{n:05d}")
                       for n in range(12) for key in (TRACKED, RANGE_INSIDE)]
            assert set(answers) == {"GREYLISTED"}
            held = figures(lab.server.url)
            assert (held["queue_depth"], held["dropped_queue_full"], held["dropped"]) == (
                5, 19, 19)
            # The lock outlasts the store's busy timeout: the writer reports it, once.
            wait_for(lambda: "sightings: cannot write" in lab.server.output(), 30, 0.2)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        found = lab.settled(recorded=6)
        wait_for(lambda: "writing works again" in lab.server.output(), 10, 0.2)
        output = lab.server.stop()
    lab.client.close()

    assert found["recorded"] == len(lab.sightings()) == 6
    assert output.count("sightings: cannot write") == 1


def test_a_flood_of_subscribers_for_one_device_is_capped(lab: Lab) -> None:
    for n in range(40):
        assert lab.check(f"imei-{TRACKED}", f"imsi-2380100000{n:05d}") == "GREYLISTED"

    found = lab.settled(recorded=16)

    assert found["recorded"] == 16 and found["dropped_device_flood"] == 24
    assert len(lab.sightings()) == 16


@pytest.mark.postgres
def test_sightings_are_written_to_postgresql_too(tmp_path: Path, postgres_url: str) -> None:
    record_id = seed_record(postgres_url, TRACKED, "track")
    port = free_port()
    config = write_eir_config(tmp_path, postgres_url, port=port)
    config.write_text(config.read_text() + sightings_config())
    with EirServer(config, port) as server, httpx.Client(timeout=10) as client:
        for _ in range(10):
            answer = client.get(server.url + EIC, params={"pei": f"imeisv-{TRACKED}21",
                                                          "supi": f"imsi-{IMSI}"})
            assert answer.json() == {"status": "GREYLISTED"}
        wait_for(lambda: len(rows(postgres_url, models.Sighting)) == 1, 15, 0.1)
        time.sleep(1.5)  # a second batch would have been written by now
    [sighting] = rows(postgres_url, models.Sighting)
    assert (sighting.record_id, sighting.svn, sighting.imsi_state) == (record_id, "21", "present")
    cipher = DataCipher.from_key_file(tmp_path / "data.key", create=False)
    assert cipher.decrypt(sighting.imsi_enc, context=f"sighting:{sighting.sighting_id}") == IMSI
