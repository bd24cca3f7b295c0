"""``imeisync run`` as systemd runs it: a real process, a real configuration, loopback ports.

Readiness on a NOTIFY_SOCKET of the test's own; SIGTERM with requests in flight on both listeners
(none fails, exit 0, a last push); SIGHUP reloading police keys without dropping a request; the
scheduled push and pull against a real registry; a dead registry leaving attach checks alone;
one daemon per SQLite file. The scale-out on PostgreSQL is in ``test_daemon_scaleout.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from imeisync.adapters.keys import generate_keypair
from imeisync.adapters.police_jws import sign_order
from imeisync.domain.imei import luhn_check_digit
from imeisync.store.db import Database
from imeisync.store.models import OutboxChange
from support.daemon_harness import (
    IMEISYNC,
    Daemon,
    NotifySocket,
    clean_env,
    daemon_config,
    metric,
    token,
    wait_for,
)
from support.registry_lab import Lab, free_port

ROOT = Path(__file__).resolve().parent.parent


def imei(n: int) -> str:
    key = f"35{n:012d}"
    return key + luhn_check_digit(key)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-dk", "DK"), ("op-se", "SE")])
    yield lab
    lab.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.cleanup()


def _has_api() -> bool:
    try:
        import imeisync.entrypoints.api  # noqa: F401
    except ImportError:
        return False
    return True


# -- readiness, health, metrics --------------------------------------------------------------


def test_ready_is_notified_once_the_index_is_loaded_and_both_listeners_answer(
        lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = Daemon(config, eir, api, env={"NOTIFY_SOCKET": str(notify.path),
                                           "WATCHDOG_USEC": "1000000"})
    daemons.append(daemon)
    try:
        daemon.start(wait=False)
        wait_for(lambda: notify.first("READY", "1"), 30, what="READY=1")
        # At READY=1 both listeners answer and every worker has its index.
        assert daemon.check(imei(1)) == "WHITELISTED"
        health = daemon.health()
        assert health["attach_check"]["answering"] is True
        assert health["attach_check"]["ready_workers"] == 2
        assert health["leader"]["mode"] == "sqlite-single-node"
        assert "serving" in notify.first("READY", "1")[1]["STATUS"]
        assert notify.first("MAINPID")[1]["MAINPID"] == str(daemon.pid)
        # WATCHDOG_USEC=1s: pinged every half second while healthy.
        wait_for(lambda: notify.count("WATCHDOG") >= 3, 5, what="WATCHDOG=1 pings")

        # /metrics on both listeners: every worker's attach checks and the daemon's figures.
        for listener in ("api", "eir"):
            text = daemon.metrics(listener)
            for family in ("imeisync_attach_checks_total", "imeisync_attach_check_seconds_bucket",
                           "imeisync_attach_index_entries", "imeisync_outbox_changes",
                           "imeisync_orders_total", "imeisync_disputes_open",
                           "imeisync_sync_feed_lag", "imeisync_rejected_changes_total",
                           "imeisync_leader", "imeisync_job_runs_total"):
                assert family in text, (listener, family)
            assert text.count("# TYPE imeisync_attach_checks_total counter") == 1
            workers = {line.split('worker="')[1].split('"')[0] for line in text.splitlines()
                       if line.startswith("imeisync_attach_index_entries{")}
            assert len(workers) == 2, (listener, workers)
        eir_health = daemon.health("eir")
        assert eir_health["status"] in ("ok", "stale")
        assert eir_health["workers"]["ready"] == 2
        assert "sync" in eir_health and "leader" in eir_health

        # One daemon per SQLite file: a second one refuses, naming the first.
        other = subprocess.run([IMEISYNC, "--config", str(config), "run"], capture_output=True,
                               text=True, env=clean_env(), timeout=60)
        assert other.returncode == 3
        assert f"pid {daemon.pid}" in other.stderr and "PostgreSQL" in other.stderr
        assert daemon.check(imei(1)) == "WHITELISTED"  # the first one is untouched

        assert daemon.stop() == 0
        assert notify.first("STOPPING", "1") is not None
    finally:
        notify.close()


# -- SIGTERM ---------------------------------------------------------------------------------


def _partial_request(port: int, path: str) -> socket.socket:
    """A request whose head is not finished yet: in flight from the server's point of view."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
    return sock


def _finish(sock: socket.socket) -> bytes:
    sock.sendall(b"Connection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def test_sigterm_finishes_requests_in_flight_makes_a_last_push_and_exits_0(
        lab: Lab, daemons: list[Daemon]) -> None:
    lab.start()
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="30s", pull="5m")
    daemon = Daemon(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    blocked = imei(2)
    lab.operators["op-dk"].cli("order", "block", "--imei", blocked, "--case", "C-1",
                               "--unit", "Copenhagen Police")
    wait_for(lambda: daemon.check(blocked) == "BLACKLISTED", 5)

    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def hammer() -> None:  # keep-alive clients: after SIGTERM only "connection refused" is fair
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    response = client.get(daemon.eir + "/n5g-eir-eic/v1/equipment-status",
                                          params={"pei": f"imei-{blocked}"})
                except httpx.ConnectError:
                    return  # the listener is closed: nothing was in flight
                except httpx.RemoteProtocolError as exc:
                    # An idle keep-alive connection closed by the server before it read a
                    # request (HTTP/1.1 allows it; clients retry). Nothing was in flight.
                    if "without sending" not in str(exc):
                        failures.append(repr(exc))
                    return
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    return
                if response.status_code != 200 or response.json() != {"status": "BLACKLISTED"}:
                    failures.append(f"{response.status_code} {response.text[:100]}")
                answered[0] += 1

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    in_flight = [_partial_request(eir, f"/n5g-eir-eic/v1/equipment-status?pei=imei-{blocked}")
                 for _ in range(4)] + [_partial_request(api, "/metrics") for _ in range(2)]
    wait_for(lambda: answered[0] > 50, 20, what="load flowing")  # requests flow at SIGTERM
    daemon.send(signal.SIGTERM)
    time.sleep(0.5)  # the servers are draining now
    answers = [_finish(sock) for sock in in_flight]
    code = daemon.stop(timeout=60)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)

    assert code == 0
    assert failures == []
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b'"BLACKLISTED"' in answers[0]
    # Stopped accepting: nothing listens any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", eir), timeout=1)
    log = daemon.log()
    assert "event=daemon.final_push" in log
    assert "event=daemon.stopped" in log
    assert "Traceback" not in log


# -- SIGHUP ----------------------------------------------------------------------------------


def test_sighup_reloads_police_keys_without_dropping_requests(
        lab: Lab, tmp_path: Path, daemons: list[Daemon]) -> None:
    config, eir, api = daemon_config(lab, "op-dk", push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    bearer = token(config) if _has_api() else None
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = Daemon(config, eir, api, env={"NOTIFY_SOCKET": str(notify.path)})
    daemons.append(daemon)
    try:
        daemon.start()
        assert daemon.health()["police_keys"]["kids"] == ["cph-police"]
        # A second police authority's key arrives after the start.
        private, public = generate_keypair("aarhus-police", tmp_path / "aarhus")
        trusted = lab.operators["op-dk"].folder / "police-keys"
        shutil.copy(public, trusted / "aarhus-police.pub")

        def aarhus(n: int) -> str:
            payload = {"order_id": f"AAR-{n}-{time.time_ns()}", "kind": "block",
                       "imei": imei(100 + n), "case_ref": "AAR-2026-7", "police_unit":
                       "Aarhus Police", "reason": "stolen", "issued_at": datetime.now(UTC)
                       .strftime("%Y-%m-%dT%H:%M:%SZ")}
            return sign_order(payload, private, "aarhus-police")

        headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/jose"}
        if bearer:
            before = httpx.post(daemon.api + "/api/v1/orders", content=aarhus(1),
                                headers=headers, timeout=10)
            assert before.status_code == 422, before.text  # not trusted yet

        failures: list[str] = []
        done = threading.Event()

        def hammer() -> None:
            with httpx.Client(timeout=10) as client:
                while not done.is_set():
                    try:
                        for url in (daemon.api + "/healthz", daemon.eir + "/healthz"):
                            if client.get(url).status_code != 200:
                                failures.append(url)
                        daemon.check(imei(7), client)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        thread = threading.Thread(target=hammer)
        thread.start()
        time.sleep(0.3)
        daemon.send(signal.SIGHUP)
        wait_for(lambda: daemon.events("reload.done"), 10, what="reload.done")
        time.sleep(0.3)
        done.set()
        thread.join(timeout=10)
        assert failures == []
        assert daemon.health()["police_keys"]["kids"] == ["aarhus-police", "cph-police"]
        assert notify.first("RELOADING", "1") is not None
        if bearer:
            after = httpx.post(daemon.api + "/api/v1/orders", content=aarhus(2),
                               headers=headers, timeout=10)
            assert after.status_code in (200, 201), after.text
            wait_for(lambda: daemon.check(imei(102)) == "BLACKLISTED", 2)

        # A broken key file: the reload is refused and the keys in force stay.
        (trusted / "broken.pub").write_text("not a key")
        daemon.send(signal.SIGHUP)
        wait_for(lambda: daemon.events("reload.failed"), 10, what="reload.failed")
        assert daemon.health()["police_keys"]["kids"] == ["aarhus-police", "cph-police"]
        assert daemon.stop() == 0
    finally:
        notify.close()


# -- the schedule ----------------------------------------------------------------------------


def test_scheduled_push_and_pull_happen_and_an_order_is_pushed_within_a_second(
        lab: Lab, daemons: list[Daemon]) -> None:
    lab.start()
    # Push every minute: an order must still reach the registry within a second (the outbox
    # watch), while the pull every second brings the other operator's records.
    config, eir, api = daemon_config(lab, "op-dk", push="60s", pull="1s")
    daemon = Daemon(config, eir, api)
    daemons.append(daemon)
    se = lab.operator("op-se")
    daemon.start()

    foreign = imei(3)
    se.cli("order", "block", "--imei", foreign, "--case", "SE-1", "--unit", "Polisen")
    se.cli("sync", "push")
    took = wait_for(lambda: daemon.check(foreign) == "BLACKLISTED", 10, what="pulled")
    assert took < 5

    ours = imei(4)
    dk = lab.operators["op-dk"]
    dk.cli("order", "block", "--imei", ours, "--case", "DK-1", "--unit", "Copenhagen Police")
    # The order is committed when the command returns; from then on the clock runs.
    db = Database(dk.app.config.database_url)
    try:
        def pushed() -> bool:
            with db.read() as session:
                return session.execute(select(OutboxChange.state)).scalar() == "accepted"

        took = wait_for(pushed, 5, interval=0.02, what="pushed")
    finally:
        db.dispose()
    assert took < 1.0, f"pushed {took:.2f}s after the order was accepted"
    se.cli("sync", "pull")
    assert se.cli("check", ours).stdout.strip() == "BLACKLISTED"

    text = daemon.metrics()
    assert metric(text, "imeisync_job_runs_total", job="pull", result="ok") >= 3
    assert metric(text, "imeisync_job_runs_total", job="push", result="ok") >= 1
    assert metric(text, "imeisync_sync_last_success_timestamp_seconds", step="pull") > 0
    assert metric(text, "imeisync_orders_total", kind="block", outcome="accepted") == 1
    assert metric(text, "imeisync_outbox_changes", state="pending") == 0
    assert metric(text, "imeisync_leader") == 1
    health = daemon.health()
    assert health["status"] == "ok", health
    assert health["registry"]["registry_reachable"] is True
    assert daemon.stop() == 0


def test_a_dead_registry_does_not_stop_attach_checks_and_the_outbox_catches_up(
        lab: Lab, daemons: list[Daemon]) -> None:
    # The registry is not started; its port is held (bound, not listening) meanwhile so that no
    # other server takes it: connections are refused, as with a registry that is down.
    hold = socket.socket()
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.bind(("127.0.0.1", lab.port))
    config, eir, api = daemon_config(lab, "op-dk", push="1s", pull="1s")
    daemon = Daemon(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    dk = lab.operators["op-dk"]
    blocked = imei(5)
    dk.cli("order", "block", "--imei", blocked, "--case", "DK-2", "--unit", "Copenhagen Police")
    wait_for(lambda: daemon.check(blocked) == "BLACKLISTED", 2)
    wait_for(lambda: len(daemon.events("job.failed")) >= 2, 15, what="failures logged")
    with httpx.Client(timeout=5) as client:
        for _ in range(200):
            assert daemon.check(blocked, client) == "BLACKLISTED"
    wait_for(lambda: daemon.health()["status"] == "degraded", 5, what="degraded")
    health = daemon.health()
    assert health["attach_check"]["answering"] is True
    assert health["registry"]["registry_reachable"] is False
    assert httpx.get(daemon.api + "/healthz", timeout=5).status_code == 200
    failing = daemon.events("job.failed")[0]
    assert "unreachable" in failing and "next_run=" in failing
    wait_for(lambda: metric(daemon.metrics(), "imeisync_sync_step_failing", step="push") == 1,
             10)

    hold.close()
    lab.start()  # the registry comes back: the next run sends what waited
    wait_for(lambda: daemon.events("job.recovered"), 15, what="recovered")
    wait_for(lambda: json.loads(dk.cli("--json", "sync", "status").stdout)["outbox"]["accepted"]
             == 1, 10)
    assert daemon.stop() == 0


# -- systemd units ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` of both units (their ExecStart must exist: a stand-in)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for unit in ("imeisync.service", "imeisync-registry.service"):
        text = (ROOT / "systemd" / unit).read_text()
        exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        program = exec_start.split("=", 1)[1].split()[0]
        fake = bin_dir / Path(program).name
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        (tmp_path / unit).write_text(text.replace(program, str(fake)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(tmp_path / "imeisync.service"),
                             str(tmp_path / "imeisync-registry.service")],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if ("imeisync" in line and "Failed to" not in line.split(":")[0])
                or "Unknown" in line or "Invalid" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems == [], problems


def test_a_killed_attach_check_server_is_restarted_at_once(
        lab: Lab, daemons: list[Daemon]) -> None:
    config, eir, api = daemon_config(lab, "op-dk", push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    daemon = Daemon(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    wait_for(lambda: daemon.events("daemon.ready"), 10, what="READY")
    children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
    assert len(children) == 1  # the attach-check server's Granian master
    os.kill(int(children[0]), signal.SIGKILL)
    wait_for(lambda: daemon.events("eir.died"), 5, what="death noticed")
    down = time.monotonic()  # its workers are killed with it: the port is free again
    wait_for(lambda: daemon.check(imei(9)) == "WHITELISTED", 20, what="answering again")
    assert time.monotonic() - down < 10
    assert "restarting it now" in daemon.events("eir.died")[0]
    assert daemon.health()["attach_check"]["answering"] is True
    assert daemon.stop() == 0
