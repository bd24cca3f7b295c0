"""Real servers for the console: a registry, operators each serving the police API and console
(``python -m imeisync.entrypoints.api`` in a subprocess on a free port), and headless Chromium.

Used by ``tests/test_console_browser.py`` and ``scripts/screenshots.py`` (which puts ``tests/``
on the path).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from support.registry_lab import Lab, Operator, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return (f"{CHROMIUM} is missing: run ./scripts/test as root to install Debian's "
                "chromium package, or `apt-get install chromium`")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[test]'"
    return None


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@dataclass
class ConsoleServer:
    operator: Operator
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, name: str, role: str = "liaison") -> str:
        secret, _ = self.operator.app.tokens.add(name, role, created_by="lab")
        return secret

    def start(self, timeout: float = 20.0) -> ConsoleServer:
        log_path = self.operator.folder / "api.log"
        log = open(log_path, "ab")  # noqa: SIM115 (kept open by the child)
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imeisync.entrypoints.api", "--config",
             str(self.operator.config_path), "--listen", f"127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("console server exited: " + log_path.read_text()[-2000:])
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("console server did not start: " + log_path.read_text()[-2000:])

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        self.process = None


class ConsoleLab:
    """A registry and operators with consoles: ``lab.console("op-a")``, ``lab.sync()``."""

    def __init__(self, root: Path, members: list[tuple[str, str]]):
        self.lab = Lab(root, members)
        self.consoles: dict[str, ConsoleServer] = {}

    def __enter__(self) -> ConsoleLab:
        self.lab.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def console(self, op_id: str) -> ConsoleServer:
        port = free_port()
        folder = self.lab.root / op_id
        operator = self.lab.operator(op_id, extra=(
            f'[api]\nlisten = "127.0.0.1:{port}"\ntokens_file = "{folder / "tokens.json"}"\n'))
        server = ConsoleServer(operator, port).start()
        self.consoles[op_id] = server
        return server

    def sync(self, *op_ids: str) -> None:
        """Push then pull for each operator named, in order (what the daemon does on its own)."""
        for op_id in op_ids:
            service = self.lab.operators[op_id].app.sync()
            try:
                service.push()
                service.pull()
            finally:
                service.close()

    def police_order(self, kind: str, imei: str, **fields: Any) -> str:
        return self.lab.police_order(kind, imei, **fields)

    def close(self) -> None:
        for server in self.consoles.values():
            server.stop()
        self.lab.close()


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
