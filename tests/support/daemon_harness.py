"""Helpers for the daemon tests: ``imeisync run`` as a real process with a real configuration,
a NOTIFY_SOCKET of our own, and ways to look at it from outside (its listeners, its log).

``Daemon`` runs ``imeisync --config PATH run`` in its own session on free loopback ports;
``start()`` waits until the API listener's ``/healthz`` says attach checks are answered;
``stop(sig)`` returns the exit status; ``log()`` what it wrote. ``NotifySocket`` is the
service manager's end of sd_notify: a datagram socket whose messages the test reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from support.registry_lab import Lab, free_port

IMEISYNC = str(Path(sys.executable).parent / "imeisync")
EIC = "/n5g-eir-eic/v1/equipment-status"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IMEISYNC_", "NOTIFY_SOCKET", "WATCHDOG_", "RUNTIME_DIRECTORY"))}
    env.update(extra)
    return env


def daemon_config(lab: Lab, op_id: str, database_url: str | None = None, *,
                  push: str = "1s", pull: str = "1s", workers: int = 1,
                  registry_url: str | None = None, extra: str = "") -> tuple[Path, int, int]:
    """A config for ``op_id`` of ``lab`` with free listener ports: (path, eir port, api port)."""
    eir, api = free_port(), free_port()
    folder = lab.root / op_id
    operator = lab.operator(op_id, database_url, extra=(
        f'[eir]\nlisten = "127.0.0.1:{eir}"\nworkers = {workers}\n'
        f'index_file = "{folder / f"attach-index-{eir}.bin"}"\n'
        f'[api]\nlisten = "127.0.0.1:{api}"\ntokens_file = "{folder / "tokens.json"}"\n'
        f'[sync]\npush_interval = "{push}"\npull_interval = "{pull}"\n' + extra))
    text = operator.config_path.read_text()
    if registry_url is not None:
        text = re.sub(r'url = "http://127\.0\.0\.1:\d+"', f'url = "{registry_url}"', text)
    path = folder / f"node-{api}.toml"  # one file per daemon: several may share a database
    path.write_text(text)
    return path, eir, api


class NotifySocket:
    """The service manager's side of sd_notify: collects what the daemon sends."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def first(self, key: str, value: str | None = None) -> tuple[float, dict[str, str]] | None:
        for when, fields in list(self.messages):
            if key in fields and (value is None or fields[key] == value):
                return when, fields
        return None

    def count(self, key: str) -> int:
        return sum(1 for _, fields in list(self.messages) if key in fields)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class Daemon:
    def __init__(self, config: Path, eir_port: int, api_port: int, *,
                 env: dict[str, str] | None = None):
        self.config = config
        self.eir = f"http://127.0.0.1:{eir_port}"
        self.api = f"http://127.0.0.1:{api_port}"
        self.env = env or {}
        self.logfile = config.parent / f"daemon-{api_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self, *, timeout: float = 30.0, wait: bool = True) -> Daemon:
        handle = open(self.logfile, "ab")  # noqa: SIM115 -- the child writes it until it ends
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([IMEISYNC, "--config", str(self.config), "run"],
                                     stdout=handle, stderr=subprocess.STDOUT,
                                     env=clean_env(**self.env), start_new_session=True)
        handle.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.api + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout}s:\n{self.log()[-4000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def events(self, name: str) -> list[str]:
        return [line for line in self.log().splitlines() if f"event={name} " in line]

    def health(self, listener: str = "api") -> dict[str, Any]:
        base = self.api if listener == "api" else self.eir
        return httpx.get(base + "/healthz", timeout=5).json()

    def metrics(self, listener: str = "api") -> str:
        base = self.api if listener == "api" else self.eir
        return httpx.get(base + "/metrics", timeout=5).text

    def check(self, imei: str, client: httpx.Client | None = None) -> str:
        getter = client.get if client is not None else httpx.get
        response = getter(self.eir + EIC, params={"pei": f"imei-{imei}"}, timeout=5)
        response.raise_for_status()
        return response.json()["status"]

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=10)
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.log()[-4000:]}"
                                 ) from None
        return code

    def kill(self) -> None:
        """kill -9 the supervisor (its attach-check child follows it: PR_SET_PDEATHSIG)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None if absent)."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        if metric_name != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def wait_for(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> float:
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s: {what}")
        time.sleep(interval)


def token(config: Path, name: str = "liaison-test", role: str = "liaison") -> str:
    result = subprocess.run([IMEISYNC, "--json", "--config", str(config), "token", "add",
                             "--name", name, "--role", role], capture_output=True, text=True,
                            env=clean_env(), timeout=60, check=True)
    return json.loads(result.stdout)["token"]
