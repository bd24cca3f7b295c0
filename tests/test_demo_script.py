"""``./scripts/run`` (the demo) stops cleanly when its terminal is closed, as it does on Ctrl-C.

The script runs from a copy of the repository's layout in a temporary folder (its own ``var/``,
the project's virtual environment), on a pseudo-terminal that is its controlling terminal;
closing the terminal's master side is what a closed terminal window does: the kernel sends
SIGHUP to the session leader, the script.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pty
import re
import shutil
import subprocess
import sys
import termios
from pathlib import Path

import httpx

from support.daemon_harness import clean_env, wait_for

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                for child in (task / "children").read_text().split():
                    if int(child) not in found:
                        found.add(int(child))
                        todo.append(int(child))
    return found


def running(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
    return alive


def test_closing_the_terminal_of_scripts_run_stops_the_demo_like_ctrl_c(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "run", repo / "scripts" / "run")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    shutil.copy(ROOT / "scripts" / "lock", repo / "scripts" / "lock")  # run asks it first
    shutil.copytree(ROOT / "requirements", repo / "requirements")
    venv = Path(sys.prefix)
    (repo / ".venv").symlink_to(venv)  # this environment, already holding imeisync
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not (venv / f".installed-{digest}").exists():
        (venv / f".run-installed-{digest}").touch()  # what the script writes once installed
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # after setsid: the pty becomes the session's terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    script = subprocess.Popen(["bash", str(repo / "scripts" / "run")], stdin=slave,
                              stdout=slave, stderr=slave, start_new_session=True,
                              preexec_fn=controlling_terminal,
                              env=clean_env(IMEISYNC_RUN_ANY_PORT="1"))
    os.close(slave)
    output = bytearray()
    os.set_blocking(master, False)
    demo: set[int] = set()

    def read() -> str:
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(master, 65536):
                output.extend(chunk)
        return output.decode(errors="replace")

    try:
        wait_for(lambda: "demo running" in read() or script.poll() is not None, 120,
                 interval=0.2, what="the demo started")
        assert script.poll() is None, read()
        api = re.search(r'\[api\]\nlisten = "([^"]+)"',
                        (repo / "var" / "imeisync.toml").read_text())
        assert api is not None
        assert httpx.get(f"http://{api.group(1)}/healthz", timeout=5).status_code == 200
        demo = descendants(script.pid)
        assert len(running(demo)) >= 3  # registry, daemon and its attach-check server at least
        os.close(master)  # the terminal window closes
        master = -1
        script.wait(timeout=60)
        gone = wait_for(lambda: not running(demo), 30, what="every demo process stopped")
    finally:
        if master >= 0:
            os.close(master)
        if script.poll() is None:
            script.kill()
        for pid in running(demo | descendants(script.pid)):  # whatever a failure left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    log = (repo / "var" / "log" / "daemon.log").read_text()
    assert "event=daemon.stopped" in log
    assert "event=reload" not in log  # the hang-up is not taken for a reload
    print(f"\ndemo stopped {gone:.1f}s after its terminal closed")
