"""Scale-out on PostgreSQL: two ``imeisync run`` daemons of one operator on one database.

Both answer attach checks; an order accepted on one is answered by the other within a second;
only the leader (the holder of the advisory lock) pushes and pulls; ``kill -9`` of the leader
hands the lead to the other within one election interval, which then pushes what follows; and
no change is ever sent twice (every outbox row answered ``accepted`` on its first attempt).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from imeisync.domain.imei import luhn_check_digit
from imeisync.registry.models import FeedEntry
from imeisync.store.db import Database
from imeisync.store.models import OutboxChange
from support.daemon_harness import Daemon, daemon_config, metric, token, wait_for
from support.registry_lab import Lab


def imei(n: int) -> str:
    key = f"86{n:012d}"
    return key + luhn_check_digit(key)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-dk", "DK"), ("op-se", "SE")])
    lab.start()
    yield lab
    lab.close()


def _api_order(daemon: Daemon, bearer: str, number: int) -> None:
    response = httpx.post(daemon.api + "/api/v1/orders", timeout=10, json={
        "imei": imei(number), "case_ref": f"CPH-{number}", "police_unit": "Copenhagen Police",
        "reason": "stolen"}, headers={"Authorization": f"Bearer {bearer}"})
    assert response.status_code == 201, response.text


def test_two_daemons_share_a_database_one_leads_and_the_other_takes_over(
        lab: Lab, postgres_url: str, record_property: pytest.RecordProperty) -> None:
    pytest.importorskip("imeisync.entrypoints.api")
    nodes = []
    for _ in range(2):
        config, eir, api = daemon_config(lab, "op-dk", postgres_url, push="1s", pull="1s")
        nodes.append(Daemon(config, eir, api))
    bearer = token(nodes[0].config)
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()

        def leaders() -> list[Daemon]:
            return [n for n in nodes if n.proc and n.proc.poll() is None
                    and n.health()["leader"]["this_node"]]

        wait_for(lambda: len(leaders()) == 1, 10, what="one leader")
        leader = leaders()[0]
        follower = next(n for n in nodes if n is not leader)
        assert follower.health()["leader"]["mode"] == "postgresql-advisory-lock"

        # An order accepted by one daemon is answered by both within a second (each attach
        # index follows the database's change sequence every 200 ms).
        for number, (accepting, other) in enumerate(((follower, leader), (leader, follower)), 1):
            _api_order(accepting, bearer, number)
            for node in (other, accepting):
                took = wait_for(lambda n=node, i=number: n.check(imei(i)) == "BLACKLISTED", 2,
                                interval=0.02)
                assert took < 1.0

        db = Database(postgres_url)

        def outbox() -> list[tuple[str, int]]:
            with db.read() as session:
                return [tuple(r) for r in session.execute(
                    select(OutboxChange.state, OutboxChange.attempts))]

        try:
            wait_for(lambda: [s for s, _ in outbox()] == ["accepted"] * 2, 5, what="pushed")
            # Only the leader runs the sync jobs.
            time.sleep(1.5)
            follower_metrics, leader_metrics = follower.metrics(), leader.metrics()
            for job in ("push", "pull"):
                assert metric(leader_metrics, "imeisync_job_runs_total", job=job,
                              result="ok") >= 1
                for result in ("ok", "failed"):
                    assert metric(follower_metrics, "imeisync_job_runs_total", job=job,
                                  result=result) == 0
            assert "event=job.done job=push" in leader.log()
            assert "job=push" not in follower.log()
            assert metric(follower_metrics, "imeisync_leader") == 0

            # kill -9 the leader: the other takes the lead within one election interval.
            killed_at = time.monotonic()
            leader.kill()
            failover = wait_for(lambda: follower.health()["leader"]["this_node"], 10,
                                interval=0.02, what="failover")
            record_property("failover_seconds", round(failover, 3))
            print(f"\nfailover after kill -9 of the leader: {failover:.2f}s")
            assert failover < 2.5  # election every min(push_interval, 5s) = 1s, plus slack
            assert follower.events("leader.acquired")

            # The new leader pushes what is accepted from now on; still nothing sent twice.
            _api_order(follower, bearer, 3)
            wait_for(lambda: [s for s, _ in outbox()] == ["accepted"] * 3, 5,
                     what="pushed by the new leader")
            assert time.monotonic() - killed_at < 8
            assert all(attempts == 1 for _, attempts in outbox()), outbox()
            registry = Database(lab.registry_db or "")
            try:
                with registry.read() as session:
                    changes = session.execute(select(func.count()).select_from(FeedEntry)
                                              .where(FeedEntry.type == "change")).scalar_one()
            finally:
                registry.dispose()
            assert changes == 3
            assert follower.check(imei(3)) == "BLACKLISTED"
        finally:
            db.dispose()
        assert follower.stop() == 0
    finally:
        for node in nodes:
            node.cleanup()
