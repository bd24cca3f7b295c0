"""Sightings from the S13 attach check: the S13 process on loopback, python-diameter as the MME.

The node recorded is the MME's Origin-Host, the software version the ECR's Software-Version, the
IMSI its User-Name (encrypted); another operator's tracked device is a notice; the figures reach
the process's snapshot on the daemon's board with ``interface="s13"``.
"""

from __future__ import annotations

from pathlib import Path

from imeisync.adapters.data_crypto import DataCipher
from imeisync.entrypoints.s13 import S13Figures
from imeisync.entrypoints.telemetry import render
from imeisync.store import models
from support.eir_harness import free_port, wait_for
from support.s13_harness import MME, Mme, S13Server, write_s13_config
from support.sightings_lab import figures_of, rows, seed_record, sightings_config, stored_bytes

TRACKED = "49015420323751"
FOREIGN_TRACKED = "35209900176148"
IMSI = "238010123456789"


def test_an_s13_check_of_a_tracked_device_is_a_sighting_naming_the_mme(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    record_id = seed_record(url, TRACKED, "track", case_ref="CASE-S13")
    seed_record(url, FOREIGN_TRACKED, "track", owner="op-se")
    port = free_port()
    config = write_s13_config(tmp_path, url, port=port)
    config.write_text(config.read_text() + sightings_config())
    server = S13Server(config, port, board=tmp_path / "run")
    with server:
        mme = Mme(port).start()
        try:
            for _ in range(30):
                assert mme.check(TRACKED, imsi=IMSI, software="42").equipment_status == 2
            assert mme.check(FOREIGN_TRACKED, imsi=IMSI).equipment_status == 2
        finally:
            mme.stop()

        def settled() -> bool:
            snap = server.figures().get("sightings") or {}
            return snap.get("recorded") == 1 and snap.get("noticed") == 1
        wait_for(settled, 15, 0.2)
        text = render(list(S13Figures(server.figures()).collect())).decode()
        found = figures_of(text, "s13")

    assert (found["recorded"], found["noticed"], found["deduplicated"], found["dropped"]) == (
        1, 1, 29, 0)
    [sighting] = rows(url, models.Sighting)
    assert (sighting.interface, sighting.node, sighting.svn, sighting.status) == (
        "s13", MME, "42", "GREYLISTED")
    assert (sighting.record_id, sighting.case_ref, sighting.imsi_state) == (
        record_id, "CASE-S13", "present")
    cipher = DataCipher.from_key_file(tmp_path / "data.key", create=False)
    assert cipher.decrypt(sighting.imsi_enc, context=f"sighting:{sighting.sighting_id}") == IMSI
    [notice] = rows(url, models.SightingNotice)
    assert (notice.imei_key, notice.owner_id, notice.direction) == (
        FOREIGN_TRACKED, "op-se", "sent")
    assert IMSI.encode() not in stored_bytes(tmp_path)
