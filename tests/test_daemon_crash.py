"""A crashed daemon comes back: nothing a crash leaves behind keeps ``imeisync run`` from starting
again, no child outlives its supervisor by more than a few seconds, every child stops on SIGTERM
within its bound, and a hung child is replaced.

The drill: signed police orders through A's police API while A's supervisor is SIGKILLed at
random moments (during start-up, during a push, mid-request) and restarted; every acknowledged
order is then in A's store once, at the registry once and blocked at B, and nothing of A's runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imeisync.domain.imei import luhn_check_digit
from imeisync.entrypoints.daemon.children import LISTENER_DRAIN
from imeisync.entrypoints.daemon.records import RunFolder, start_time
from imeisync.entrypoints.daemon.supervisor import PING_EVERY, PING_TIMEOUT, hung_after
from imeisync.services.devices import status_from_store
from support.daemon_harness import Daemon as DaemonProcess
from support.daemon_harness import NotifySocket, daemon_config, token, wait_for
from support.registry_lab import Lab, free_port

ORDERS = 500
KILLS = 8


def imei(n: int) -> str:
    key = f"35{n:012d}"
    return key + luhn_check_digit(key)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-dk", "DK"), ("op-se", "SE")])
    yield lab
    lab.close()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.cleanup()
        for pid in processes_of(daemon.config):  # a test that failed half-way: leave nothing
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_of(config: Path) -> list[int]:
    """Every live process whose command line names ``config`` (supervisor, master, workers)."""
    names = {str(config), str(config.resolve())}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(a.decode(errors="replace") in names for a in argv):
            found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone_within(pids: list[int], timeout: float) -> float:
    """Seconds until none of ``pids`` runs (zombies count as gone); fails after ``timeout``."""
    def alive() -> list[int]:
        return [p for p in pids if start_time(p) is not None and Path(
            f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    return wait_for(lambda: not alive(), timeout, what=f"processes {pids} gone")


# -- the drill ---------------------------------------------------------------------------------


def test_drill_kill_9_of_the_supervisor_at_random_moments_loses_no_order_and_leaves_nothing(
        lab: Lab, daemons: list[DaemonProcess]) -> None:
    pytest.importorskip("imeisync.entrypoints.api")
    lab.start()
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="1s", pull="5m")
    b = lab.operator("op-se")
    bearer = token(config)
    # Orders as fast as the daemon takes them, whatever [api] token_rate says by default.
    daemon = DaemonProcess(config, eir, api, env={"IMEISYNC_API_TOKEN_RATE": "100000/s",
                                                  "IMEISYNC_API_ADDRESS_RATE": "100000/s"})
    daemons.append(daemon)
    orders = {f"DRILL-{i}": lab.police_order("block", imei(i), order_id=f"DRILL-{i}")
              for i in range(ORDERS)}
    acked: dict[str, int] = {}
    refused: list[str] = []
    stop = threading.Event()

    def client() -> None:
        headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/jose"}
        with httpx.Client(timeout=5) as http:
            for order_id, jws in orders.items():
                while not stop.is_set():
                    try:
                        response = http.post(daemon.api + "/api/v1/orders", content=jws,
                                             headers=headers)
                    except httpx.HTTPError:
                        time.sleep(0.02)  # the daemon is down or restarting: try again
                        continue
                    if response.is_success or response.status_code == 409:
                        acked[order_id] = response.status_code
                        break
                    if response.status_code < 500:
                        refused.append(f"{order_id}: {response.status_code} {response.text}")
                        break
                    time.sleep(0.02)

    rng = random.Random()
    daemon.start()
    sender = threading.Thread(target=client)
    sender.start()
    started = time.monotonic()
    moments = ["start-up", "serving"] * (KILLS // 2)
    rng.shuffle(moments)
    for moment in moments:
        if moment == "start-up":  # before READY: the child may be loading, or not yet started
            time.sleep(rng.uniform(0.2, 1.5))
        else:  # orders in flight, and a push within a second of each accepted one
            daemon.wait_ready(60)
            time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(daemon.pid, signal.SIGKILL)  # the supervisor's process group, as kill -9 -PGID
        assert daemon.proc is not None
        daemon.proc.wait(timeout=10)
        daemon.start(wait=False)  # at once: the crash's leftovers are still stopping
    daemon.wait_ready(60)  # every restart succeeds: the last one answers
    sender.join(timeout=120)
    stop.set()
    assert not sender.is_alive(), f"orders still not acknowledged: {ORDERS - len(acked)}"
    assert refused == []
    assert len(acked) == ORDERS

    registry = lab.root / "registry.db"

    def pushed() -> int:
        with sqlite3.connect(f"file:{registry}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(DISTINCT imei_key) FROM registry_records "
                                    "WHERE owner_id = 'op-dk'").fetchone()[0])

    wait_for(lambda: pushed() == ORDERS, 60, interval=0.5, what="every order pushed")
    code = daemon.stop(signal.SIGTERM, timeout=60)
    assert code == 0
    gone_within(processes_of(config), 5)
    assert processes_of(config) == []
    log = daemon.log()
    assert "Address already in use" not in log and "listen_failed" not in log
    assert "Traceback" not in log

    with sqlite3.connect(f"file:{lab.root / 'op-dk' / 'imeisync.db'}?mode=ro", uri=True) as c:
        taken = dict(c.execute(
            "SELECT order_id, count(*) FROM orders WHERE outcome <> 'refused' "
            "AND order_id LIKE 'DRILL-%' GROUP BY order_id").fetchall())
    assert taken == dict.fromkeys(orders, 1)
    with sqlite3.connect(f"file:{registry}?mode=ro", uri=True) as conn:
        central = conn.execute("SELECT imei_key, count(*) FROM registry_records WHERE "
                               "owner_id = 'op-dk' AND closed_seq IS NULL GROUP BY imei_key"
                               ).fetchall()
    assert sorted(central) == sorted((imei(i)[:14], 1) for i in range(ORDERS))
    b.app.sync().pull()
    with b.app.db.read() as session:
        verdicts = {str(status_from_store(session, imei(i)[:14])) for i in range(ORDERS)}
    assert verdicts == {"BLACKLISTED"}
    lab.operators["op-dk"].cli("audit", "verify")
    print(f"\ndrill: {ORDERS} orders, {KILLS} kills ({', '.join(moments)}), "
          f"{time.monotonic() - started:.1f}s; acknowledged 2xx: "
          f"{sum(1 for s in acked.values() if s != 409)}, 409: "
          f"{sum(1 for s in acked.values() if s == 409)}")


# -- SIGTERM, each within its bound ------------------------------------------------------------


def test_sigterm_to_the_attach_check_server_alone_stops_it_and_the_supervisor_replaces_it(
        lab: Lab, daemons: list[DaemonProcess]) -> None:
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    daemon = DaemonProcess(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    wait_for(lambda: daemon.events("daemon.ready"), 10, what="READY")  # a death before it is fatal
    [master] = children(daemon.pid)
    group = [master, *children(master)]
    assert len(group) == 3
    os.kill(master, signal.SIGTERM)
    took = gone_within(group, LISTENER_DRAIN + 5)
    wait_for(lambda: daemon.check(imei(1)) == "WHITELISTED", 20, what="answering again")
    assert children(daemon.pid) not in ([], [master])
    assert daemon.stop() == 0
    print(f"\nattach-check server and workers stopped {took:.2f}s after SIGTERM")


def test_a_worker_that_gets_sigterm_while_it_loads_its_index_leaves_and_its_master_follows(
        lab: Lab, daemons: list[DaemonProcess]) -> None:
    """The hang of issue 10: workers forked by Granian inherit their master's signal handler
    until the app factory returns; a SIGTERM then was swallowed, the worker went on serving and
    its master (re-parented to init) waited for it forever, holding [eir] listen."""
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    lock = config.parent / f"attach-index-{eir}.bin.lock"
    daemon = DaemonProcess(config, eir, api)
    daemons.append(daemon)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the workers wait for it in their start-up
        daemon.start(wait=False)
        wait_for(lambda: len(children(children(daemon.pid)[0]) if children(daemon.pid) else
                             []) == 2, 30, what="both workers started")
        group = processes_of(config)
        os.killpg(daemon.pid, signal.SIGKILL)  # the supervisor: the master gets SIGTERM
        time.sleep(0.5)
    took = gone_within(group, 5)
    with pytest.raises(OSError):  # [eir] listen is free again
        socket.create_connection(("127.0.0.1", eir), timeout=1).close()
    print(f"\nall gone {took:.2f}s after the supervisor's death")


def test_a_stuck_worker_is_killed_by_its_master_once_the_drain_time_is_over(
        lab: Lab, daemons: list[DaemonProcess]) -> None:
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    daemon = DaemonProcess(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    [master] = children(daemon.pid)
    workers = children(master)
    os.kill(workers[0], signal.SIGSTOP)  # cannot drain, cannot even see its SIGTERM
    os.killpg(daemon.pid, signal.SIGKILL)
    gone_within([daemon.pid], 5)
    os.kill(master, signal.SIGTERM)  # and by hand, after the supervisor is gone
    took = gone_within([master, *workers], LISTENER_DRAIN + 5)
    assert took >= LISTENER_DRAIN - 2  # the healthy worker stopped; the stuck one was waited for
    assert "did not stop within" in daemon.log()


def test_sigterm_to_imeisync_run_under_load_exits_0_within_its_bound_and_leaves_nothing(
        lab: Lab, daemons: list[DaemonProcess]) -> None:
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    daemon = DaemonProcess(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    stop = threading.Event()
    answered = [0]

    def load() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                try:
                    daemon.check(imei(answered[0] % 50), client)
                    answered[0] += 1
                except httpx.HTTPError:
                    time.sleep(0.01)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: answered[0] > 100, 20, what="load flowing")
    group = processes_of(config)
    begun = time.monotonic()
    daemon.send(signal.SIGTERM)
    code = daemon.stop(timeout=LISTENER_DRAIN + 25)
    took = time.monotonic() - begun
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert code == 0
    gone_within(group, 5)
    assert took < LISTENER_DRAIN + 25
    print(f"\nimeisync run stopped {took:.2f}s after SIGTERM under load")


# -- hung, not dead ----------------------------------------------------------------------------


def _watched_daemon(lab: Lab, tmp_path: Path,
                    daemons: list[DaemonProcess]) -> tuple[DaemonProcess, NotifySocket]:
    """A started daemon under a 1 s systemd watchdog (its pings on ``notify``), pinging."""
    config, eir, api = daemon_config(lab, "op-dk", workers=1, push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = DaemonProcess(config, eir, api, env={"NOTIFY_SOCKET": str(notify.path),
                                                  "WATCHDOG_USEC": "1000000"})
    daemons.append(daemon)
    try:
        daemon.start()
        wait_for(lambda: notify.count("WATCHDOG") >= 3, 10, what="watchdog pings")
    except BaseException:
        notify.close()
        raise
    return daemon, notify


def test_a_sigstopped_attach_check_server_is_replaced_and_the_watchdog_waits_meanwhile(
        lab: Lab, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    daemon, notify = _watched_daemon(lab, tmp_path, daemons)
    try:
        [master] = children(daemon.pid)
        old = [master, *children(master)]
        os.killpg(master, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: daemon.events("eir.hung"), 15, what="hung child noticed")
        wait_for(lambda: children(daemon.pid) not in ([], [master]), 5, what="replacement")
        replaced = time.monotonic() - stopped
        wait_for(lambda: daemon.check(imei(3)) == "WHITELISTED", 20, what="answering again")
        gone_within(old, 5)  # the stopped ones were killed, not left behind
        seen = notify.count("WATCHDOG")
        wait_for(lambda: notify.count("WATCHDOG") > seen, 5, what="pings resumed")
        pings = [when for when, fields in list(notify.messages) if "WATCHDOG" in fields]
        gaps = [b - a for a, b in itertools.pairwise(pings) if a >= stopped - 1]
        assert gaps and max(gaps) > 1.0, gaps  # withheld while the attach check was silent
        assert daemon.events("watchdog.withheld")
        assert replaced < hung_after(0.5) + PING_EVERY + PING_TIMEOUT + 2
        assert daemon.stop() == 0
    finally:
        notify.close()


def test_the_hung_bound_replaces_a_child_within_half_the_watchdog_time() -> None:
    for interval in (4.0, 5.0, 10.0, 30.0, 120.0):  # WatchdogSec/2
        # the last answer can be PING_EVERY + PING_TIMEOUT old; the main loop wakes every 0.25 s
        assert hung_after(interval) + PING_EVERY + PING_TIMEOUT + 0.25 <= interval
    assert hung_after(None) == hung_after(120.0)


def test_a_sigstopped_supervisor_stops_the_watchdog_pings_while_the_attach_check_answers(
        lab: Lab, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    daemon, notify = _watched_daemon(lab, tmp_path, daemons)
    try:
        os.kill(daemon.pid, signal.SIGSTOP)
        time.sleep(0.3)
        before = notify.count("WATCHDOG")
        time.sleep(3)
        assert notify.count("WATCHDOG") == before  # nobody pings for a stopped supervisor
        assert daemon.check(imei(4)) == "WHITELISTED"  # its children do not give up on it
        os.kill(daemon.pid, signal.SIGCONT)
        wait_for(lambda: notify.count("WATCHDOG") > before, 5, what="pings resumed")
        assert daemon.stop() == 0
    finally:
        notify.close()


# -- a restart always succeeds -----------------------------------------------------------------


def test_a_restart_stops_the_leftover_attach_check_server_of_a_crashed_run_first(
        lab: Lab, daemons: list[DaemonProcess]) -> None:
    config, eir, api = daemon_config(lab, "op-dk", workers=2, push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}")
    daemon = DaemonProcess(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    [master] = children(daemon.pid)
    old = [master, *children(master)]
    os.killpg(master, signal.SIGSTOP)  # so it cannot notice its supervisor's death by itself
    os.killpg(daemon.pid, signal.SIGKILL)
    assert daemon.proc is not None
    daemon.proc.wait(timeout=10)
    daemon.start(timeout=60)  # stops the leftover (SIGTERM, then SIGKILL), then binds
    [line] = daemon.events("daemon.leftover")
    assert f"pid {master}" in line and "processes=3" in line
    gone_within(old, 1)
    assert daemon.check(imei(5)) == "WHITELISTED"
    assert daemon.stop() == 0


def test_the_run_folder_never_stops_a_process_that_is_not_a_leftover(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    me = os.getpid()
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # the pid of a record, now another process (its start time differs)
        folder.record("eir", stranger.pid)
        record = folder._path("eir")
        record.write_text(record.read_text().replace(
            f'"started": {start_time(stranger.pid)}', '"started": 1').replace(
            f'"supervisor": {me}', '"supervisor": 999999999'))
        assert folder.stop_leftovers(bound=0.5) == []
        assert stranger.poll() is None
        # its supervisor (this process) still runs: not a leftover
        folder.record("eir", stranger.pid)
        assert folder.stop_leftovers(bound=0.5) == []
        assert stranger.poll() is None
        # the same process, its supervisor gone: a leftover, stopped
        record.write_text(record.read_text().replace(f'"supervisor": {me}',
                                                     '"supervisor": 999999999'))
        assert folder.stop_leftovers(bound=2) == [stranger.pid]
        assert stranger.wait(timeout=5) == -signal.SIGTERM
        assert not record.exists()
    finally:
        stranger.kill()
        stranger.wait()


# -- the registry server -----------------------------------------------------------------------


def test_the_registry_servers_worker_stops_when_its_master_is_killed(lab: Lab) -> None:
    lab.start()
    assert lab.process is not None
    master = lab.process.pid
    workers = children(master)
    assert len(workers) == 1
    os.kill(master, signal.SIGKILL)  # the master only: its worker must notice by itself
    lab.process.wait(timeout=10)
    took = gone_within(workers, 5)
    with pytest.raises(OSError):  # its port is free again
        socket.create_connection(("127.0.0.1", lab.port), timeout=1).close()
    lab.process = None
    print(f"\nregistry worker gone {took:.2f}s after its master's death")
