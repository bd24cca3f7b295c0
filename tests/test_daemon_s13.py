"""``imeisync run`` with ``[s13]``: the S13 listener as a supervised child.

Readiness waits for it, ``/healthz`` names its peers by host, ``/metrics`` has its figures in
the attach-check families (label ``interface="s13"``) and its own; a killed S13 process is
restarted; SIGTERM sends DPR to every peer before the daemon exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imeisync.adapters.diameter import codec as c
from imeisync.config import load_config
from imeisync.entrypoints.daemon.records import RunFolder, run_folder
from support.daemon_harness import IMEISYNC, Daemon, clean_env, daemon_config, metric, wait_for
from support.registry_lab import Lab, free_port
from support.s13_harness import MME, RawPeer, cer, ecr

UNKNOWN = "01234567890123"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-dk", "DK")])
    yield lab
    lab.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.cleanup()


def s13_section(port: int, peers: str = f'["{MME}"]') -> str:
    return (f'[s13]\nlisten = "127.0.0.1:{port}"\norigin_host = "eir1.epc.test"\n'
            f'origin_realm = "epc.test"\npeers = {peers}\nwatchdog = "30s"\n')


def start(lab: Lab, daemons: list[Daemon]) -> tuple[Daemon, int]:
    port = free_port()
    config, eir, api = daemon_config(lab, "op-dk", push="30s", pull="5m",
                                     registry_url=f"http://127.0.0.1:{free_port()}",
                                     extra=s13_section(port))
    daemon = Daemon(config, eir, api)
    daemons.append(daemon)
    daemon.start()
    wait_for(lambda: daemon.events("daemon.ready"), 20, what="READY")
    return daemon, port


def s13_child(daemon: Daemon) -> int:
    for pid in Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split():
        if "imeisync.entrypoints.s13" in Path(f"/proc/{pid}/cmdline").read_text():
            return int(pid)
    raise AssertionError("no S13 child")


def test_ready_health_and_metrics_include_s13_and_its_peers(lab: Lab,
                                                            daemons: list[Daemon]) -> None:
    daemon, port = start(lab, daemons)
    assert daemon.health()["s13"]["answering"] is True
    with RawPeer(port).open() as peer:
        answer = peer.ask(ecr(UNKNOWN))
        assert answer.result == c.SUCCESS and answer.u32(c.EQUIPMENT_STATUS) == 0
        wait_for(lambda: daemon.health()["s13"]["peers"] == {MME: 1}, 5, what="peer shown")
        text = daemon.metrics()
    families = {f.name for f in text_string_to_metric_families(text)}  # a valid exposition
    assert {"imeisync_attach_checks", "imeisync_s13_peers", "imeisync_s13_answers"} <= families
    assert metric(text, "imeisync_attach_checks_total", interface="s13",
                  outcome="WHITELISTED") == 1
    assert metric(text, "imeisync_s13_peers", host=MME) == 1
    assert metric(text, "imeisync_s13_answers_total", command="ECR", result_code="2001") == 1
    assert metric(text, "imeisync_attach_check_seconds_count", interface="s13") == 1
    with RawPeer(port) as rogue:
        rogue.send(cer("rogue.epc.test"))
        assert rogue.closed()
    wait_for(lambda: metric(daemon.metrics(), "imeisync_s13_peers_refused_total",
                            reason="unknown peer") == 1, 5, what="refusal counted")
    assert daemon.stop() == 0


def test_killed_s13_listener_is_restarted_and_sigterm_sends_dpr(lab: Lab,
                                                                daemons: list[Daemon]) -> None:
    daemon, port = start(lab, daemons)
    os.kill(s13_child(daemon), signal.SIGKILL)
    wait_for(lambda: daemon.events("s13.died"), 5, what="death noticed")
    assert "restarting it now" in daemon.events("s13.died")[0]

    def answers() -> bool:
        try:
            with RawPeer(port).open() as peer:
                return peer.ask(ecr(UNKNOWN)).result == c.SUCCESS
        except (OSError, AssertionError):
            return False

    wait_for(answers, 20, what="S13 answering again")
    with RawPeer(port).open() as peer:
        time.sleep(0.2)
        daemon.send(signal.SIGTERM)
        peer.sock.settimeout(10)
        dpr = peer.read()
        assert dpr is not None and dpr.header.code == c.CMD_DPR and dpr.header.flags & c.FLAG_R
        peer.answer_disconnect(dpr)
        assert peer.closed(5)
    assert daemon.stop() == 0
    assert "sent DPR to 1 peer(s)" in daemon.log()


def test_bad_s13_config_is_refused_at_start_without_a_traceback(lab: Lab) -> None:
    config, _, _ = daemon_config(lab, "op-dk", extra=s13_section(free_port(), peers="[]"))
    result = subprocess.run([IMEISYNC, "--config", str(config), "run"], capture_output=True,
                            text=True, env=clean_env(), timeout=60)
    assert result.returncode != 0
    assert "[s13] peers is empty" in result.stderr and "Traceback" not in result.stderr


def test_s13_listener_dies_with_a_killed_supervisor(lab: Lab, daemons: list[Daemon]) -> None:
    daemon, port = start(lab, daemons)
    child = s13_child(daemon)
    daemon.kill()  # kill -9: no chance to stop its children

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
        return state == "Z"  # exited, waiting to be reaped by init

    wait_for(gone, 5, what="the S13 process exits")
    with pytest.raises(OSError):
        RawPeer(port, timeout=1)


def test_a_stopped_s13_listener_is_replaced_and_its_run_record_follows(
        lab: Lab, daemons: list[Daemon]) -> None:
    """SIGSTOP: the port still accepts connections (the kernel's backlog), but the listener's
    loop writes no figures; the supervisor kills it and starts another, as for the HTTP one."""
    daemon, port = start(lab, daemons)
    old = s13_child(daemon)
    os.kill(old, signal.SIGSTOP)
    wait_for(lambda: daemon.events("s13.hung"), 20, what="hung S13 listener noticed")
    assert f"pid {old}" in daemon.events("s13.hung")[0]

    def replaced() -> bool:
        try:
            return s13_child(daemon) != old
        except AssertionError:
            return False

    wait_for(replaced, 10, what="a new S13 listener")
    new = s13_child(daemon)
    wait_for(lambda: not alive(old), 5, what="the stopped listener gone")
    wait_for(lambda: daemon.health()["s13"]["answering"], 20, what="S13 answering again")
    with RawPeer(port).open() as peer:
        assert peer.ask(ecr(UNKNOWN)).result == c.SUCCESS
    runs = RunFolder(run_folder(load_config(str(daemon.config))))
    assert {r.kind: r.pid for r in runs.records()}.get("s13") == new  # for the next start
    assert daemon.stop() == 0
    assert "s13" not in {r.kind for r in runs.records()}  # stopped in order: record dropped


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
