"""Helpers for the attach-check tests: a real server process on loopback, seeded stores.

``EirServer`` runs ``python -m imeisync.entrypoints.eir --config PATH --workers 1`` on a free
127.0.0.1 port and waits until ``/healthz`` answers; ``stop()`` ends it with SIGTERM (a clean
Granian shutdown, which persists the index) and returns what it logged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from imeisync.store import models
from imeisync.store.db import Database
from imeisync.store.schema import ensure_schema

EIC = "/n5g-eir-eic/v1/equipment-status"
ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/support/ is two below


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_eir_config(folder: Path, database_url: str, *, port: int, unknown_status: str =
                     "WHITELISTED", tls: tuple[Path, Path] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "police-keys").mkdir(exist_ok=True)
    path = folder / "imeisync.toml"
    tls_lines = f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n' if tls else ""
    path.write_text(
        '[operator]\nid = "op-dk"\ncountry = "DK"\n'
        f'[database]\nurl = "{database_url}"\n'
        f'[police]\ntrusted_keys = "{folder / "police-keys"}"\n'
        f'[security]\ndata_key_file = "{folder / "data.key"}"\n'
        f'[eir]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n'
        f'index_file = "{folder / "attach-index.bin"}"\nunknown_status = "{unknown_status}"\n'
        + tls_lines,
        encoding="utf-8",
    )
    return path


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def imeisync(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The ``imeisync`` CLI in its own process, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-c", "from imeisync.entrypoints.cli import main; main()",
         "--config", str(config), *args],
        capture_output=True, text=True, env=cli_env(), timeout=60, check=check,
    )


class EirServer:
    def __init__(self, config: Path, port: int, *, scheme: str = "http"):
        self.config = config
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.log = config.parent / f"eir-{port}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30.0, verify: Any = True) -> EirServer:
        handle = open(self.log, "wb")  # noqa: SIM115 -- the child writes it until stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imeisync.entrypoints.eir", "--config", str(self.config),
             "--workers", "1"],
            stdout=handle, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True,
        )
        handle.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"eir server exited early:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1, verify=verify).status_code < 500:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"eir server not ready within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait(timeout=5)
        self.proc = None
        return self.output()

    def __enter__(self) -> EirServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def seed(database_url: str, records: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
         exceptions: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
    """Open records (key, kind, owner) and exceptions (key, imsi) the way sync or intake
    would: each with its change_log row."""
    db = Database(database_url)
    try:
        ensure_schema(db)
        now = datetime.now(UTC)
        with db.write() as session:
            for n, (key, kind, owner) in enumerate(records):
                session.add(models.Record(
                    imei_key=key, owner_id=owner, owner_country="SE", kind=kind,
                    reason="stolen", source="registry", opened_at=now,
                    opened_by=f"{owner}:c{n}-{time.monotonic_ns()}",
                ))
                session.add(models.ChangeLog(imei_key=key, subject="record", op="open",
                                             kind=kind, at=now))
            for key, imsi in exceptions:
                session.add(models.AttachException(
                    imei_key=key, imsi=imsi, case_ref="CASE-1", created_at=now,
                    created_by="test"))
                session.add(models.ChangeLog(imei_key=key, subject="exception", op="open",
                                             kind=None, at=now))
    finally:
        db.dispose()


def status_of(client: httpx.Client, base: str, pei: str, supi: str | None = None) -> str:
    params = {"pei": pei} if supi is None else {"pei": pei, "supi": supi}
    response = client.get(base + EIC, params=params)
    if response.status_code == 404:
        return response.json()["cause"]
    response.raise_for_status()
    return response.json()["status"]


class RsgiScope:
    """The fields of Granian's RSGI scope the attach check reads."""

    def __init__(self, method: str, path: str, query: str = ""):
        self.proto, self.method, self.path, self.query_string = "http", method, path, query


class RsgiProtocol:
    """Records what the app answers through RSGI's ``response_bytes``."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, list[tuple[str, str]], bytes]] = []

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.sent.append((status, headers, body))


async def call_rsgi(app: Any, method: str, path: str, query: str = "") -> tuple[int, bytes]:
    """Drive the attach-check app directly, as Granian would; exactly one answer per call."""
    proto = RsgiProtocol()
    await app.__rsgi__(RsgiScope(method, path, query), proto)
    assert len(proto.sent) == 1
    return proto.sent[0][0], proto.sent[0][2]


def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> float:
    """Seconds until ``predicate()`` was true; raises AssertionError after ``timeout``."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s")
        time.sleep(interval)
