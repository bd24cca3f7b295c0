"""Sightings through ``imeisync run``: a police track order, then attach checks over N5g-eir (two
Granian workers) and S13 (the Diameter child); one sighting per interface, and the figures of
every attach-check process on the API listener's ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imeisync.services.orders import Actor
from imeisync.store import models
from support.daemon_harness import Daemon, daemon_config, wait_for
from support.eir_harness import EIC
from support.registry_lab import Lab, free_port
from support.s13_harness import MME, RawPeer, ecr
from support.sightings_lab import figures_of, rows

IMEI = "490154203237518"
IMSI = "238010123456789"
OTHER_IMSI = "238010123456790"  # one sighting per (device, subscriber), whatever the interface


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-dk", "DK")])
    yield lab
    lab.close()


def test_a_tracked_device_seen_on_both_interfaces_is_a_sighting_each_shown_in_metrics(
        lab: Lab) -> None:
    s13_port = free_port()
    config, eir, api = daemon_config(
        lab, "op-dk", workers=2, push="30s", pull="5m",
        registry_url=f"http://127.0.0.1:{free_port()}",
        extra=(f'[s13]\nlisten = "127.0.0.1:{s13_port}"\norigin_host = "eir1.epc.test"\n'
               f'origin_realm = "epc.test"\npeers = ["{MME}"]\nwatchdog = "30s"\n'))
    operator = lab.operators["op-dk"]
    outcome = operator.app.intake().submit_signed(lab.police_order("track", IMEI),
                                                  Actor("alice"))
    assert outcome.outcome == "accepted", outcome
    daemon = Daemon(config, eir, api)
    try:
        daemon.start()
        wait_for(lambda: daemon.events("daemon.ready"), 30, what="READY")
        with httpx.Client(timeout=5) as client:
            for _ in range(50):  # spread over both workers by the connection pool
                answer = client.get(daemon.eir + EIC, params={
                    "pei": f"imeisv-{IMEI[:14]}09", "supi": f"imsi-{IMSI}"})
                assert answer.json() == {"status": "GREYLISTED"}
        with RawPeer(s13_port).open() as peer:
            for n in range(5):
                reply = peer.ask(ecr(IMEI[:14], imsi=OTHER_IMSI, software="10", hbh=10 + n))
                assert reply.u32(1445) == 2  # Equipment-Status: greylisted

        def recorded(interface: str) -> float | None:
            return figures_of(daemon.metrics(), interface).get("recorded")

        wait_for(lambda: recorded("n5g-eir") == 1 and recorded("s13") == 1, 20,
                 interval=0.3, what="sightings on /metrics")
        text = daemon.metrics()
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()

    found = {(s.interface, s.svn, s.node) for s in rows(operator.app.config.database_url,
                                                        models.Sighting)}
    assert found == {("n5g-eir", "09", "127.0.0.1"), ("s13", "10", MME)}
    assert text.count("# TYPE imeisync_sightings_total counter") == 1
    assert "imeisync_sightings_queue_depth" in text
