"""Configuration: one TOML file, every key overridable by ``IMEISYNC_<SECTION>_<KEY>``.

The schema below is the single list of keys (CONTRACT.md). Unknown keys and wrong types are
refused at start with one line naming the file, the key and what was expected: an operator
who mistypes ``max_shrink`` must hear about it, not run with the default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imeisync.adapters.rate_limit import check_rate
from imeisync.config_sections import (
    ApiSection,
    DatabaseSection,
    EirSection,
    LogSection,
    OperatorSection,
    PoliceSection,
    RegistrySection,
    S13Section,
    Sections,
    SecuritySection,
    SightingsSection,
    SyncSection,
    build_sections,
)
from imeisync.config_values import (
    Parser,
    at_least,
    boolean,
    check_country,
    check_listen,
    check_operator_id,
    diameter_identity,
    fraction,
    http_url_or_empty,
    integer,
    listen_or_off,
    log_format_choice,
    log_level_choice,
    peer_list,
    seconds,
    share,
    status_choice,
    string,
    time_of_day,
    transport_choice,
    unknown_tac_choice,
)
from imeisync.domain.errors import BadInput
from imeisync.entrypoints.admission import MAX_INFLIGHT, PER_CLIENT_SHARE

DEFAULT_CONFIG_PATH = Path("config/imeisync.toml")

SCHEMA: dict[str, dict[str, tuple[Parser, Any]]] = {
    "operator": {"id": (check_operator_id, "demo-op"), "country": (check_country, "DK")},
    "database": {"url": (string, "sqlite:///var/imeisync.db")},
    "police": {
        "trusted_keys": (string, "var/police-keys"),
        "allow_unsigned_blocks": (boolean, True),
        "max_order_age": (seconds("7d"), "7d"),
        "max_range": (at_least(integer, 1, "a whole number of devices, at least 1"), 100_000),
    },
    "eir": {
        "listen": (check_listen, "127.0.0.1:8080"),
        "workers": (at_least(integer, 0, "a whole number, 0 for one per core"), 0),
        "tls_cert": (string, ""),
        "tls_key": (string, ""),
        "unknown_status": (status_choice, "WHITELISTED"),
        "unknown_tac": (unknown_tac_choice, "ignore"),
        "index_file": (string, "var/attach-index.bin"),  # persisted attach index
        # admission control (entrypoints/admission.py): checks queued per worker, and the
        # fraction of them one client (AMF address, Diameter Origin-Host) may hold
        "max_inflight": (at_least(integer, 1, "a whole number of attach checks, at least 1"),
                         MAX_INFLIGHT),
        "per_client_share": (share, PER_CLIENT_SHARE),
    },
    "s13": {  # the Diameter S13 attach check (4G/5G NSA); listen empty: off
        "listen": (listen_or_off, ""),
        "transport": (transport_choice, "tcp"),
        "origin_host": (diameter_identity, "eir.imeisync.invalid"),
        "origin_realm": (diameter_identity, "imeisync.invalid"),
        "peers": (peer_list, []),
        "watchdog": (seconds("30s"), "30s"),
    },
    "api": {
        "listen": (check_listen, "127.0.0.1:8081"),
        "tokens_file": (string, "var/tokens.json"),
        "tls_cert": (string, ""),  # HTTPS for the police API and console (else plain HTTP)
        "tls_key": (string, ""),
        "address_rate": (check_rate, "50/s"),  # every request, per client address
        "token_rate": (check_rate, "20/s"),  # per token (API) or signed-in person (console)
        "foreign_lookup_rate": (check_rate, "120/h"),  # device look-ups showing foreign records
    },
    "registry": {
        "url": (string, "http://127.0.0.1:8090"),
        "signing_key": (string, "var/keys/operator.key"),
        "kid": (string, "demo-op"),
        "registry_public_key": (string, "var/keys/registry.pub"),
    },
    "sync": {
        "push_interval": (seconds("30s"), "30s"),
        "pull_interval": (seconds("1m"), "1m"),
        "reconcile_at": (time_of_day, "03:30"),
        "max_shrink": (fraction, 0.25),
        "receipt_deadline": (seconds("2h"), "2h"),
        "outage_after": (seconds("10m"), "10m"),
    },
    "security": {
        "data_key_file": (string, "var/data.key"),
        "retention_days": (at_least(integer, 1, "a whole number of days, at least 1"), 730),
        "foreign_retention_days": (at_least(integer, 1, "a whole number of days, at least 1"), 30),
    },
    "sightings": {  # tracked devices seen by the attach check (personal data: see README)
        "dedupe": (seconds("15m"), "15m"),
        "retention_days": (at_least(integer, 1, "a whole number of days, at least 1"), 90),
        "blocked_attempts": (boolean, False),
        "queue_size": (at_least(integer, 1, "a whole number, at least 1"), 10000),
        "webhook_url": (http_url_or_empty, ""),
        "webhook_key": (string, ""),
    },
    "log": {"format": (log_format_choice, "kv"), "level": (log_level_choice, "INFO")},
}

# Keys holding file system paths: relative ones are taken from the config file's folder's parent
# (the project root when the file lives in config/), so a config works from any working directory.
PATH_KEYS = {
    ("police", "trusted_keys"),
    ("eir", "tls_cert"),
    ("eir", "tls_key"),
    ("eir", "index_file"),
    ("api", "tokens_file"),
    ("api", "tls_cert"),
    ("api", "tls_key"),
    ("registry", "signing_key"),
    ("registry", "registry_public_key"),
    ("security", "data_key_file"),
    ("sightings", "webhook_key"),
}


@dataclass(frozen=True)
class Config:
    """Parsed configuration: a typed, frozen section each (``config.sync.max_shrink``)."""

    sections: Mapping[str, Mapping[str, Any]]
    source: str = "(defaults)"
    base_dir: Path = field(default_factory=Path.cwd)
    typed: Sections = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "typed", build_sections(self.sections, self.source))

    def get(self, section: str, key: str) -> Any:
        return self.sections[section][key]

    @property
    def operator(self) -> OperatorSection:
        return self.typed.operator

    @property
    def database(self) -> DatabaseSection:
        return self.typed.database

    @property
    def police(self) -> PoliceSection:
        return self.typed.police

    @property
    def eir(self) -> EirSection:
        return self.typed.eir

    @property
    def s13(self) -> S13Section:
        return self.typed.s13

    @property
    def api(self) -> ApiSection:
        return self.typed.api

    @property
    def registry(self) -> RegistrySection:
        return self.typed.registry

    @property
    def sync(self) -> SyncSection:
        return self.typed.sync

    @property
    def security(self) -> SecuritySection:
        return self.typed.security

    @property
    def sightings(self) -> SightingsSection:
        return self.typed.sightings

    @property
    def log(self) -> LogSection:
        return self.typed.log

    @property
    def operator_id(self) -> str:
        return str(self.sections["operator"]["id"])

    @property
    def operator_country(self) -> str:
        return str(self.sections["operator"]["country"])

    @property
    def database_url(self) -> str:
        return str(self.sections["database"]["url"])

    def path(self, section: str, key: str) -> Path:
        return Path(self.sections[section][key])


def resolve_path(base_dir: Path, value: str) -> str:
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path))


def resolve_sqlite_url(base_dir: Path, url: str) -> str:
    # sqlite:///relative/path is relative to the base dir, like every other path in the file.
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////"):
        rest = url[len(prefix) :]
        # "file:..." is an SQLite URI (…?mode=ro&uri=true), left as written.
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str(base_dir / rest)
    return url


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, str], str]:
    overrides: dict[tuple[str, str], str] = {}
    for name, value in environ.items():
        if not name.startswith("IMEISYNC_") or name == "IMEISYNC_CONFIG":
            continue
        rest = name[len("IMEISYNC_") :].lower()
        section = next((s for s in SCHEMA if rest.startswith(s + "_")), None)
        if section is None:
            # Not IMEISYNC_<SECTION>_…: a variable of the program or its tools (IMEISYNC_DEBUG,
            # the test harness's IMEISYNC_REQUIRE_PG), not a configuration key.
            continue
        if rest[len(section) + 1 :] in SCHEMA[section]:
            overrides[(section, rest[len(section) + 1 :])] = value
        else:
            raise BadInput(
                f"environment variable {name} names no configuration key",
                "use IMEISYNC_<SECTION>_<KEY>, e.g. IMEISYNC_SYNC_PULL_INTERVAL=5m",
                code="unknown_key",
            )
    return overrides


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    must_exist: bool | None = None,
) -> Config:
    """Read, validate and resolve the configuration.

    ``path`` None means ``$IMEISYNC_CONFIG`` else ``./config/imeisync.toml``; a missing default
    file gives the built-in defaults (the demo set-up), a missing named file is an error.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or "IMEISYNC_CONFIG" in environ
    file = Path(path if path is not None else environ.get("IMEISYNC_CONFIG", DEFAULT_CONFIG_PATH))
    must_exist = explicit if must_exist is None else must_exist
    raw: dict[str, Any] = {}
    if file.is_file():
        raw, base_dir = read_toml(file)
    elif must_exist:
        raise BadInput(
            f"configuration file {file} does not exist",
            "pass --config PATH or set IMEISYNC_CONFIG; "
            "config/imeisync.example.toml lists every key",
        )
    else:
        base_dir = Path.cwd()
    return _validate(raw, _env_overrides(environ), str(file), base_dir)


def read_toml(file: Path) -> tuple[dict[str, Any], Path]:
    """A TOML file's contents, and the folder its relative paths are taken from: the file's
    own, or the project root when the file lives in ``config/``."""
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{file}: not valid TOML: {exc}", "fix the file's syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{file}: cannot be read: {exc}") from None
    base_dir = file.resolve().parent
    if base_dir.name == "config":
        base_dir = base_dir.parent
    return raw, base_dir


def _validate(
    raw: Mapping[str, Any], env: Mapping[tuple[str, str], str], source: str, base_dir: Path
) -> Config:
    for section, body in raw.items():
        if section not in SCHEMA:
            raise BadInput(
                f"{source}: unknown section [{section}]",
                f"known sections: {', '.join(SCHEMA)}",
                code="unknown_key",
            )
        if not isinstance(body, dict):
            raise BadInput(f"{source}: [{section}] must be a table of keys")
        for key in body:
            if key not in SCHEMA[section]:
                raise BadInput(
                    f"{source}: unknown key {key!r} in [{section}]",
                    f"known keys: {', '.join(SCHEMA[section])}",
                    code="unknown_key",
                )
    sections: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        parsed: dict[str, Any] = {}
        for key, (parse, default) in keys.items():
            origin = source
            value = raw.get(section, {}).get(key, default)
            if (section, key) in env:
                value = env[(section, key)]
                origin = f"IMEISYNC_{section.upper()}_{key.upper()}"
            try:
                parsed[key] = parse(value)
            except (TypeError, ValueError) as exc:
                raise BadInput(
                    f"{origin}: [{section}] {key} = {value!r} is not valid: expected {exc}",
                    code="bad_value",
                ) from None
            if (section, key) in PATH_KEYS:
                parsed[key] = resolve_path(base_dir, parsed[key])
        sections[section] = parsed
    sections["database"]["url"] = resolve_sqlite_url(base_dir, sections["database"]["url"])
    _registry_kid_is_operator_id(sections, raw, env, source)
    return Config(sections=sections, source=source, base_dir=base_dir)


def _registry_kid_is_operator_id(
    sections: dict[str, dict[str, Any]], raw: Mapping[str, Any],
    env: Mapping[tuple[str, str], str], source: str,
) -> None:
    """The registry knows an operator by its id and finds its key by the signature's kid: they
    must be one name, or our own records would come back from the feed as someone else's."""
    operator_id = sections["operator"]["id"]
    given = ("registry", "kid") in env or "kid" in raw.get("registry", {})
    if not given:
        sections["registry"]["kid"] = operator_id
    elif sections["registry"]["kid"] != operator_id:
        raise BadInput(
            f"{source}: [registry] kid = {sections['registry']['kid']!r} differs from "
            f"[operator] id = {operator_id!r}",
            "the registry knows this operator by its id: set both to the same name "
            "(or leave kid out)",
            code="bad_value",
        )
