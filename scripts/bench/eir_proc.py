"""An attach-check server for the overload benchmarks: a real ``imeisync.entrypoints.eir``
process on 127.0.0.1 with its own small store, its memory and its log (not a test helper)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EIC = "/n5g-eir-eic/v1/equipment-status"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_open_files(wanted: int) -> int:
    """``ulimit -n`` for this process and the servers it starts: up to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def create_store(db: Path, src: Path = ROOT / "src") -> None:
    """An empty SQLite store with imeisync's schema (every attach check: an unknown device)."""
    if db.exists():
        return
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", (
        "import sys; from imeisync.store.db import Database; "
        "from imeisync.store.schema import ensure_schema; "
        "ensure_schema(Database(sys.argv[1]))"), f"sqlite:///{db}"], check=True, env=env)


class Eir:
    """``python -m imeisync.entrypoints.eir`` with ``workers`` workers and ``eir_lines`` added
    to ``[eir]``; ``src`` runs another source tree (e.g. an export of main, for a baseline)."""

    def __init__(self, workdir: Path, *, workers: int = 1, eir_lines: str = "",
                 src: Path | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.src = src or ROOT / "src"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "police-keys").mkdir(exist_ok=True)
        db = workdir / "imeisync.db"
        self.config = workdir / "imeisync.toml"
        self.config.write_text(
            '[operator]\nid = "op-dk"\ncountry = "DK"\n'
            f'[database]\nurl = "sqlite:///{db}"\n'
            f'[police]\ntrusted_keys = "{workdir / "police-keys"}"\n'
            f'[security]\ndata_key_file = "{workdir / "data.key"}"\n'
            f'[log]\nlevel = "WARNING"\n'
            f'[eir]\nlisten = "127.0.0.1:{self.port}"\nworkers = {workers}\n'
            f'index_file = "{workdir / "attach-index.bin"}"\n{eir_lines}', encoding="utf-8")
        self.log = workdir / f"eir-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        create_store(db, self.src)

    def start(self, timeout: float = 60) -> Eir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}
        env["PYTHONPATH"] = str(self.src)
        with open(self.log, "wb") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imeisync.entrypoints.eir", "--config", str(self.config)],
                stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the attach check exited:\n{self.output()}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(self.url + "/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"the attach check did not start in {timeout}s:\n{self.output()}")

    def pids(self) -> list[int]:
        """The server and its workers (Granian's children)."""
        assert self.proc is not None
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                    todo.extend(int(p) for p in text.split())
        return found

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def errors(self) -> list[str]:
        return [line for line in self.output().splitlines()
                if "ERROR" in line or "Traceback" in line or "CRITICAL" in line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session it was started in
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> Eir:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connection(url: str, source: str | None = None) -> Any:
    """An HTTP/1.1 keep-alive connection to the attach check (an AMF's)."""
    import http.client

    host, port = url.split("//")[1].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10,
                                      source_address=(source, 0) if source else None)


def checks(conn: Any, count: int) -> tuple[list[float], set[int]]:
    """``count`` sequential attach checks on ``conn`` (a ``connection``, or a URL for a fresh
    one): their latencies (ms) and the status codes seen."""
    if isinstance(conn, str):
        conn = connection(conn)
    latencies, statuses = [], set()
    for n in range(count):
        pei = f"imei-{35_000_000_000_000 + n:014d}"  # an empty store: all unknown
        started = time.perf_counter()
        conn.request("GET", f"{EIC}?pei={pei}")
        answer = conn.getresponse()
        answer.read()
        latencies.append((time.perf_counter() - started) * 1000)
        statuses.add(answer.status)
    return latencies, statuses


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
