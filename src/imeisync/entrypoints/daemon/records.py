"""The run folder: where the supervisor records each child it starts (pid and kernel start time,
its own too), so that the next ``imeisync run`` of the same installation can stop what a crash
left behind before it binds, and never touch a process that is not its own.

A pid alone is not an identity (pids are reused); a pid with its start time (field 22 of
``/proc/PID/stat``, in clock ticks since boot) is. The folder is ``$RUNTIME_DIRECTORY`` under
systemd, else one folder per configuration file under the temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from imeisync.config import Config
from imeisync.entrypoints.logs import event

log = logging.getLogger("imeisync.daemon")

LEFTOVER_STOP = 5.0  # seconds a leftover child gets to stop on SIGTERM before SIGKILL


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after "pid (comm)": state, ppid, pgrp, session…"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def same_process(pid: int, started: int | None) -> bool:
    return started is not None and start_time(pid) == started


def session_members(leader: int, started: int | None) -> list[int]:
    """The processes of the session ``leader`` started (a child runs in its own session), the
    leader included if it still runs. Empty if ``leader``'s pid now belongs to another process.
    A pid is not reused while a session of that number has members, so once the leader is gone,
    the members of session ``leader`` are its own (Granian's workers)."""
    now = start_time(leader)
    if now is not None and now != started:
        return []
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields is not None and len(fields) > 3 and fields[3] == str(leader) \
                    and fields[0] != "Z":  # a zombie holds nothing and cannot be signalled
                members.append(int(entry.name))
    return members


def run_folder(config: Config) -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY")  # systemd RuntimeDirectory=
    if runtime:
        return Path(runtime.split(":")[0])
    source = str(Path(config.source).resolve()) if config.source else config.database_url
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"imeisync-{os.getuid()}-{digest}"


@dataclass
class ChildRecord:
    kind: str
    pid: int
    started: int | None
    supervisor: int
    supervisor_started: int | None


class RunFolder:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, kind: str) -> Path:
        return self.folder / f"child-{kind}.json"

    def record(self, kind: str, pid: int) -> None:
        """Note a child just started (written atomically: a crash leaves the old or the new)."""
        me = os.getpid()
        data = {"kind": kind, "pid": pid, "started": start_time(pid), "supervisor": me,
                "supervisor_started": start_time(me)}
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            temp = self._path(kind).with_suffix(".tmp")
            temp.write_text(json.dumps(data))
            os.replace(temp, self._path(kind))
        except OSError as exc:
            log.warning("cannot record the %s child in %s: %s", kind, self.folder, exc)

    def forget(self, kind: str) -> None:
        with contextlib.suppress(OSError):
            self._path(kind).unlink()

    def records(self) -> list[ChildRecord]:
        found = []
        for path in sorted(self.folder.glob("child-*.json")):
            try:
                data = json.loads(path.read_text())
                found.append(ChildRecord(str(data["kind"]), int(data["pid"]), data["started"],
                                         int(data["supervisor"]), data["supervisor_started"]))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable child record %s", path)
        return found

    def stop_leftovers(self, bound: float = LEFTOVER_STOP) -> list[int]:
        """Stop every recorded child still running whose supervisor is gone (and the processes
        it forked): SIGTERM, then SIGKILL after ``bound`` seconds. The pids stopped."""
        stopped = []
        for rec in self.records():
            if same_process(rec.supervisor, rec.supervisor_started):
                continue  # its supervisor still runs: not a leftover (and not ours to stop)
            members = session_members(rec.pid, rec.started)
            if members:
                event(log, logging.WARNING, "daemon.leftover",
                      f"the {rec.kind} of a previous run (pid {rec.pid}, supervisor pid "
                      f"{rec.supervisor}, gone) still runs with {len(members)} process(es): "
                      "stopping it", pid=rec.pid, processes=len(members))
                _stop_session(rec.pid, rec.started, bound)
                stopped += members
            self.forget(rec.kind)
        return stopped


def _stop_session(leader: int, started: int | None, bound: float) -> None:
    """SIGTERM every member of the session, SIGKILL those left after ``bound`` seconds; the
    members are looked up again before each signal."""
    for sig, wait in ((signal.SIGTERM, bound), (signal.SIGKILL, 5.0)):
        members = session_members(leader, started)
        if not members:
            return
        if sig == signal.SIGKILL:
            log.warning("leftover processes %s did not stop within %ss; killing them",
                        members, bound)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(pid, signal.SIGCONT)  # a stopped process must see its SIGTERM
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_members(leader, started):
            time.sleep(0.05)
