"""The configuration's sections as frozen, typed values, built once when the file is loaded.

``imeisync.config`` validates every key (and keeps every error message); this module only turns
the validated values into one dataclass per section, parsing what needs parsing exactly once
(a listen address into host and port, ``reconcile_at`` into hour and minute). Code that needs
configuration takes ``config.eir.listen.port`` and never re-parses the text.

>>> Listen.of("[::1]:8080")
Listen(host='::1', port=8080, text='[::1]:8080')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imeisync.domain.errors import BadInput


@dataclass(frozen=True)
class Listen:
    """An ``IP:PORT`` listen address, already checked: its host (no brackets) and port."""

    host: str
    port: int
    text: str  # as written, for messages and logs

    @classmethod
    def of(cls, text: str) -> Listen:
        host, _, port = text.rpartition(":")
        return cls(host.strip("[]"), int(port), text)

    @property
    def address(self) -> tuple[str, int]:
        """What two listeners must not share."""
        return self.host, self.port

    def __str__(self) -> str:
        return self.text


class _ServesTls:
    """What a listener section with ``tls_cert``/``tls_key`` says about them ([eir], [api])."""

    section = ""  # the TOML table, for messages
    tls_cert: str
    tls_key: str

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def tls_files(self) -> tuple[Path, Path] | None:
        """The pair as files (they exist), or None for plain h2c/HTTP. Whether both or neither
        are set is checked once, at load (``build_sections``)."""
        if not self.tls_cert:
            return None
        for name, value in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            if not Path(value).is_file():
                raise BadInput(f"[{self.section}] {name} {value} does not exist",
                               "point it at a PEM file, or leave both TLS keys empty for h2c")
        return Path(self.tls_cert), Path(self.tls_key)


@dataclass(frozen=True)
class OperatorSection:
    id: str
    country: str


@dataclass(frozen=True)
class DatabaseSection:
    url: str


@dataclass(frozen=True)
class PoliceSection:
    trusted_keys: str
    allow_unsigned_blocks: bool
    max_order_age: float  # seconds
    max_range: int


@dataclass(frozen=True)
class EirSection(_ServesTls):
    section = "eir"

    listen: Listen
    workers: int  # 0: one per core
    tls_cert: str  # "" (with tls_key ""): plain h2c
    tls_key: str
    unknown_status: str
    unknown_tac: str
    index_file: str  # "": no persisted attach index
    max_inflight: int  # attach checks admitted per worker per loop batch (``admission``)
    per_client_share: float  # of those, the fraction one client may take (0 < share ≤ 1)


@dataclass(frozen=True)
class S13Section:
    listen: Listen | None  # None: the Diameter S13 listener is off
    transport: str
    origin_host: str
    origin_realm: str
    peers: tuple[str, ...]  # ("*",): any peer
    watchdog: float  # seconds


@dataclass(frozen=True)
class ApiSection(_ServesTls):
    section = "api"

    listen: Listen
    tokens_file: str
    tls_cert: str
    tls_key: str
    address_rate: str  # "N/s" | "N/m" | "N/h" (adapters/rate_limit.py)
    token_rate: str
    foreign_lookup_rate: str


@dataclass(frozen=True)
class RegistrySection:
    url: str
    signing_key: str
    kid: str
    registry_public_key: str


@dataclass(frozen=True)
class SyncSection:
    push_interval: float  # seconds, like every duration here
    pull_interval: float
    reconcile_at: tuple[int, int]  # hour, minute (UTC)
    max_shrink: float
    receipt_deadline: float
    outage_after: float


@dataclass(frozen=True)
class SecuritySection:
    data_key_file: str
    retention_days: int
    foreign_retention_days: int


@dataclass(frozen=True)
class SightingsSection:
    dedupe: float  # seconds: one sighting per (device, subscriber) per this long
    retention_days: int
    blocked_attempts: bool  # also record BLACKLISTED answers of our own records
    queue_size: int  # possible sightings waiting for a process's writer; beyond: dropped
    webhook_url: str  # "": no alerts pushed
    webhook_key: str  # PEM Ed25519 private key signing the alerts (JWS)


@dataclass(frozen=True)
class LogSection:
    format: str
    level: str


@dataclass(frozen=True)
class Sections:
    operator: OperatorSection
    database: DatabaseSection
    police: PoliceSection
    eir: EirSection
    s13: S13Section
    api: ApiSection
    registry: RegistrySection
    sync: SyncSection
    security: SecuritySection
    sightings: SightingsSection
    log: LogSection


def build_sections(values: Mapping[str, Mapping[str, Any]], source: str) -> Sections:
    """The typed sections of validated values (``imeisync.config`` has checked every one),
    cross-checked: a TLS certificate needs its key and a key its certificate, an alert
    endpoint its signing key."""
    eir, s13, api, sync = values["eir"], values["s13"], values["api"], values["sync"]
    for section, body in (("eir", eir), ("api", api)):
        if bool(body["tls_cert"]) != bool(body["tls_key"]):
            raise BadInput(f"{source}: [{section}] tls_cert and tls_key must be set together "
                           "(or neither)", code="bad_value")
    sightings = values["sightings"]
    if bool(sightings["webhook_url"]) != bool(sightings["webhook_key"]):
        raise BadInput(f"{source}: [sightings] webhook_url and webhook_key must be set together "
                       "(alerts are always signed), or neither", code="bad_value")
    hour, minute = (int(part) for part in sync["reconcile_at"].split(":"))
    return Sections(
        operator=OperatorSection(**values["operator"]),
        database=DatabaseSection(**values["database"]),
        police=PoliceSection(**values["police"]),
        eir=EirSection(**{**eir, "listen": Listen.of(eir["listen"])}),
        s13=S13Section(**{**s13, "listen": Listen.of(s13["listen"]) if s13["listen"] else None,
                          "peers": tuple(s13["peers"])}),
        api=ApiSection(**{**api, "listen": Listen.of(api["listen"])}),
        registry=RegistrySection(**values["registry"]),
        sync=SyncSection(**{**sync, "reconcile_at": (hour, minute)}),
        security=SecuritySection(**values["security"]),
        sightings=SightingsSection(**sightings),
        log=LogSection(**values["log"]),
    )
