"""A loopback lab for sync tests and benchmarks: a real registry server (``imeisync registry
serve`` in a subprocess on a free port) and operators with their own databases and keys.

Used by ``tests/test_sync_e2e.py`` and by ``scripts/bench/*`` (which put ``tests/`` on the path).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from imeisync.adapters.keys import generate_keypair
from imeisync.adapters.police_jws import sign_order
from imeisync.bootstrap import App
from imeisync.config import load_config

IMEISYNC = str(Path(sys.executable).parent / "imeisync")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Operator:
    id: str
    country: str
    config_path: Path
    folder: Path
    _app: App | None = None

    @property
    def app(self) -> App:
        if self._app is None:
            self._app = App(load_config(self.config_path))
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([IMEISYNC, "--config", str(self.config_path), *args],
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"imeisync {' '.join(args)} exited {result.returncode}: "
                                 f"{result.stderr}{result.stdout}")
        return result


@dataclass
class Lab:
    root: Path
    members: list[tuple[str, str]]  # (operator id, country)
    registry_db: str | None = None
    receives: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    server_extra: str = ""  # more [server] lines, e.g. 'member_rate = "2/s"'
    process: subprocess.Popen[bytes] | None = None
    operators: dict[str, Operator] = field(default_factory=dict)
    canary_tacs: list[str] | None = None  # [canary] tacs: canaries planted for every member
    canary_per_member: int = 5

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        keys = self.root / "keys"
        generate_keypair("registry", keys)
        for op_id, _country in self.members:
            generate_keypair(op_id, keys)
        generate_keypair("cph-police", self.root / "police")
        self.port = self.port or free_port()
        self.registry_db = self.registry_db or f"sqlite:///{self.root / 'registry.db'}"
        lines = ["[server]", f'listen = "127.0.0.1:{self.port}"',
                 f'database_url = "{self.registry_db}"',
                 f'signing_key = "{keys / "registry.key"}"', 'kid = "registry"',
                 self.server_extra, ""]
        for op_id, country in self.members:
            receives = self.receives.get(op_id, "all")
            lines += ["[[operators]]", f'id = "{op_id}"', f'country = "{country}"',
                      f'public_key = "{keys / (op_id + ".pub")}"',
                      f"receives = {json.dumps(receives)}", ""]
        if self.canary_tacs is not None:
            from imeisync.registry.canary_config import new_secret

            secret = keys / "canary.secret"
            if not secret.exists():
                new_secret(secret)
            lines += ["[canary]", f"tacs = {json.dumps(self.canary_tacs)}",
                      f'secret_file = "{secret}"', f"per_member = {self.canary_per_member}", ""]
        self.registry_config = self.root / "registry.toml"
        self.registry_config.write_text("\n".join(lines), encoding="utf-8")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the registry process -----------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 (kept open by the child)
        self.process = subprocess.Popen(
            [IMEISYNC, "registry", "serve", "--config", str(self.registry_config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("registry exited: "
                                   + (self.root / "registry.log").read_text()[-2000:])
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("registry did not start: "
                           + (self.root / "registry.log").read_text()[-2000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        self.process = None

    # -- operators ------------------------------------------------------------------------

    def operator(self, op_id: str, database_url: str | None = None, *,
                 extra: str = "") -> Operator:
        country = dict(self.members)[op_id]
        folder = self.root / op_id
        (folder / "police-keys").mkdir(parents=True, exist_ok=True)
        (folder / "police-keys" / "cph-police.pub").write_bytes(
            (self.root / "police" / "cph-police.pub").read_bytes())
        database_url = database_url or f"sqlite:///{folder / 'imeisync.db'}"
        keys = self.root / "keys"
        path = folder / "imeisync.toml"
        path.write_text(
            f'[operator]\nid = "{op_id}"\ncountry = "{country}"\n'
            f'[database]\nurl = "{database_url}"\n'
            f'[police]\ntrusted_keys = "{folder / "police-keys"}"\n'
            f'[security]\ndata_key_file = "{folder / "data.key"}"\n'
            f'[registry]\nurl = "{self.url}"\nsigning_key = "{keys / (op_id + ".key")}"\n'
            f'kid = "{op_id}"\nregistry_public_key = "{keys / "registry.pub"}"\n' + extra,
            encoding="utf-8")
        operator = Operator(op_id, country, path, folder)
        self.operators[op_id] = operator
        return operator

    def police_order(self, kind: str, imei: str, **fields: Any) -> str:
        payload = {
            "order_id": f"ORD-{kind}-{time.time_ns()}",
            "kind": kind, "imei": imei, "case_ref": "CPH-2026-118",
            "police_unit": "Copenhagen Police",
            "reason": "recovered" if kind == "lift" else "stolen",
            "issued_at": (datetime.now(UTC) - timedelta(minutes=1)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"),
        }
        payload.update(fields)
        return sign_order(payload, self.root / "police" / "cph-police.key", "cph-police")

    def close(self) -> None:
        for operator in self.operators.values():
            operator.close()
        self.stop()


# -- an in-process registry (no server): requests routed into the ASGI app ----------------------


class ASGIAdapter(requests.adapters.HTTPAdapter):
    """A ``requests`` transport that hands each request to an ASGI app (Starlette TestClient).

    Real signatures, real verification, real registry code and database; only the socket is
    missing. ``drop_answers`` > 0 makes the next N requests reach the registry but lose the
    answer (``requests.ConnectionError``): the case "the registry committed, we never heard".
    """

    def __init__(self, app: Any):
        super().__init__()
        import warnings

        with warnings.catch_warnings():  # "use httpx2": the installed httpx works
            warnings.simplefilter("ignore")
            from starlette.testclient import TestClient

        self.client = TestClient(app, raise_server_exceptions=True)
        self.drop_answers = 0
        self.requests: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> requests.Response:
        import io

        from requests.structures import CaseInsensitiveDict

        self.requests.append(request)
        answer = self.client.request(request.method or "GET", request.url or "",
                                     content=request.body or b"",
                                     headers={k: v for k, v in request.headers.items()})
        if self.drop_answers > 0:
            self.drop_answers -= 1
            raise requests.ConnectionError("connection reset (answer lost)", request=request)
        response = requests.Response()
        response.status_code = answer.status_code
        response.headers = CaseInsensitiveDict(answer.headers)
        response.raw = io.BytesIO(answer.content)
        response.request = request
        response.url = request.url or ""
        response.encoding = "utf-8"
        return response


@dataclass
class InProcessRegistry:
    """The registry app with its own database, and clients wired to it in-process."""

    root: Path
    members: list[tuple[str, str]]
    database_url: str
    receives: dict[str, Any] = field(default_factory=dict)
    canary_tacs: list[str] | None = None
    server_extra: str = ""

    def __post_init__(self) -> None:
        from imeisync.adapters.keys import load_private_key, load_public_key
        from imeisync.registry.app import RegistryApp
        from imeisync.registry.config import load_registry_config

        lab = Lab(self.root, self.members, registry_db=self.database_url,
                  receives=self.receives, port=1, canary_tacs=self.canary_tacs,
                  server_extra=self.server_extra)
        self.lab = lab
        self.config = load_registry_config(lab.registry_config)
        self.app = RegistryApp(self.config)
        self.adapter = ASGIAdapter(self.app.app)
        self.keys = {op: load_private_key(lab.root / "keys" / f"{op}.key")
                     for op, _ in self.members}
        self.registry_public = load_public_key(lab.root / "keys" / "registry.pub")
        self.url = "http://registry.test"

    def client(self, op_id: str, **options: Any) -> Any:
        from imeisync.adapters.registry_client import RegistryClient

        client = RegistryClient(self.url, signing_key=self.keys[op_id], kid=op_id,
                                registry_key=self.registry_public, **options)
        client.session.mount("http://", self.adapter)
        return client

    def operator(self, op_id: str, database_url: str) -> Operator:
        operator = self.lab.operator(op_id, database_url)
        operator.app.registry_client = lambda: self.client(op_id)  # type: ignore[method-assign]
        return operator

    def close(self) -> None:
        self.lab.close()
        self.app.db.dispose()
