"""Configuration: one TOML file, every key overridable by ``IMEISYNC_<SECTION>_<KEY>``.

The schema below is the single list of keys (CONTRACT.md). Unknown keys and wrong types are
refused at start with one line naming the file, the key and what was expected: an operator
who mistypes ``max_shrink`` must hear about it, not run with the default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imeisync.adapters.rate_limit import check_rate
from imeisync.config_sections import (
    ApiSection,
    DatabaseSection,
    EirSection,
    Listen,
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
from imeisync.domain.errors import BadInput
from imeisync.domain.fields import COUNTRY, COUNTRY_RULE, OPERATOR_ID, OPERATOR_ID_RULE
from imeisync.entrypoints.admission import MAX_INFLIGHT, PER_CLIENT_SHARE

DEFAULT_CONFIG_PATH = Path("config/imeisync.toml")

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``2h``, ``7d`` (and ``250ms``) → seconds.

    >>> parse_duration("5m")
    300.0
    """
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 2h or 7d")
    return float(int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.lower() in {"true", "1", "yes"}
    raise TypeError("true or false")


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise TypeError("a whole number")


def _fraction(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a fraction between 0 and 1, e.g. 0.25")
    if isinstance(value, str) and value.endswith("%"):
        value = float(value[:-1]) / 100
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError("a fraction between 0 and 1, e.g. 0.25") from None
    if not 0 <= number <= 1:
        raise TypeError("a fraction between 0 and 1, e.g. 0.25")
    return number


def check_listen(raw: Any) -> str:
    value = _str(raw)
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))  # the servers bind addresses, not names
    except ValueError:
        host = ""
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TypeError("IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    return value


def parse_listen(value: str, what: str = "listen") -> tuple[str, int]:
    """A listen address given on a command line, checked like the config's: (host, port)."""
    try:
        check_listen(value)
    except TypeError as exc:
        raise BadInput(f"{what} {value!r} is not valid: expected {exc}") from None
    return Listen.of(value).address



def _one_of(*choices: str, fold: Callable[[str], str] = str) -> Callable[[Any], str]:
    """A validator for a key that takes one of ``choices`` (after ``fold``, e.g. str.upper)."""
    expected = ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'

    def check(raw: Any) -> str:
        value = fold(_str(raw))
        if value not in choices:
            raise TypeError(expected)
        return value

    return check


_status = _one_of("WHITELISTED", "NOT_FOUND")
_log_level = _one_of("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper)
_unknown_tac = _one_of("ignore", "grey", "black")
_log_format = _one_of("kv", "json")
_transport = _one_of("tcp", "sctp", fold=str.lower)


def check_country(raw: Any) -> str:
    value = _str(raw)
    if not COUNTRY.fullmatch(value):
        raise TypeError(COUNTRY_RULE)
    return value


def check_operator_id(raw: Any) -> str:
    value = _str(raw)
    if not OPERATOR_ID.fullmatch(value):
        raise TypeError(f"an operator id: {OPERATOR_ID_RULE}")
    return value


def _time_of_day(raw: Any) -> str:
    value = _str(raw)
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise TypeError("a time of day HH:MM, e.g. 03:30")
    return value


def _at_least(parse: Callable[[Any], Any], low: float, what: str) -> Callable[[Any], Any]:
    """``parse``, then refuse values below ``low`` (an interval of 0s, a retention of 0 days)."""

    def check(value: Any) -> Any:
        parsed = parse(value)
        if parsed < low:
            raise TypeError(what)
        return parsed

    return check





def _share(value: Any) -> float:
    """``[eir] per_client_share``: a fraction above 0 (0 would refuse every check)."""
    share = _fraction(value)
    if share <= 0:
        raise TypeError("a fraction above 0 and at most 1, e.g. 0.5")
    return share


def _listen_or_off(value: Any) -> str:
    """``[s13] listen``: IP:PORT, or empty for off."""
    return "" if _str(value) == "" else check_listen(value)



_DIAMETER_IDENTITY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")


def _diameter_identity(raw: Any) -> str:
    value = _str(raw)
    if not _DIAMETER_IDENTITY.fullmatch(value):
        raise TypeError("a host or realm name (FQDN letters, digits, '.' and '-'), "
                        "e.g. eir1.epc.mnc001.mcc238.3gppnetwork.org")
    return value


def _peers(value: Any) -> list[str]:
    """``[s13] peers``: the Origin-Host values allowed to connect, or ``["*"]`` for any."""
    if isinstance(value, str):  # IMEISYNC_S13_PEERS="mme1.example,mme2.example"
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise TypeError('a list of peer Origin-Host names, or ["*"] for any')
    if value == ["*"]:
        return value
    return [_diameter_identity(item) for item in value]


def _webhook_url(raw: Any) -> str:
    """``[sightings] webhook_url``: empty (no alerts pushed) or an http(s) URL."""
    value = _str(raw)
    if value and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise TypeError("an http:// or https:// URL of the police unit's alert endpoint, "
                        "or empty for none")
    return value


Parser = Callable[[Any], Any]


def _seconds(example: str) -> Parser:
    return _at_least(parse_duration, 1, f"a duration of at least 1s, e.g. {example}")

# section -> key -> (parser, default). Paths are resolved against the config file's folder.
SCHEMA: dict[str, dict[str, tuple[Parser, Any]]] = {
    "operator": {"id": (check_operator_id, "demo-op"), "country": (check_country, "DK")},
    "database": {"url": (_str, "sqlite:///var/imeisync.db")},
    "police": {
        "trusted_keys": (_str, "var/police-keys"),
        "allow_unsigned_blocks": (_bool, True),
        "max_order_age": (_seconds("7d"), "7d"),
        "max_range": (_at_least(_int, 1, "a whole number of devices, at least 1"), 100_000),
    },
    "eir": {
        "listen": (check_listen, "127.0.0.1:8080"),
        "workers": (_at_least(_int, 0, "a whole number, 0 for one per core"), 0),
        "tls_cert": (_str, ""),
        "tls_key": (_str, ""),
        "unknown_status": (_status, "WHITELISTED"),
        "unknown_tac": (_unknown_tac, "ignore"),
        "index_file": (_str, "var/attach-index.bin"),  # persisted attach index
        # admission control (entrypoints/admission.py): checks queued per worker, and the
        # fraction of them one client (AMF address, Diameter Origin-Host) may hold
        "max_inflight": (_at_least(_int, 1, "a whole number of attach checks, at least 1"),
                         MAX_INFLIGHT),
        "per_client_share": (_share, PER_CLIENT_SHARE),
    },
    "s13": {  # the Diameter S13 attach check (4G/5G NSA); listen empty: off
        "listen": (_listen_or_off, ""),
        "transport": (_transport, "tcp"),
        "origin_host": (_diameter_identity, "eir.imeisync.invalid"),
        "origin_realm": (_diameter_identity, "imeisync.invalid"),
        "peers": (_peers, []),
        "watchdog": (_seconds("30s"), "30s"),
    },
    "api": {
        "listen": (check_listen, "127.0.0.1:8081"),
        "tokens_file": (_str, "var/tokens.json"),
        "tls_cert": (_str, ""),  # HTTPS for the police API and console (else plain HTTP)
        "tls_key": (_str, ""),
        "address_rate": (check_rate, "50/s"),  # every request, per client address
        "token_rate": (check_rate, "20/s"),  # per token (API) or signed-in person (console)
        "foreign_lookup_rate": (check_rate, "120/h"),  # device look-ups showing foreign records
    },
    "registry": {
        "url": (_str, "http://127.0.0.1:8090"),
        "signing_key": (_str, "var/keys/operator.key"),
        "kid": (_str, "demo-op"),
        "registry_public_key": (_str, "var/keys/registry.pub"),
    },
    "sync": {
        "push_interval": (_seconds("30s"), "30s"),
        "pull_interval": (_seconds("5m"), "5m"),
        "reconcile_at": (_time_of_day, "03:30"),
        "max_shrink": (_fraction, 0.25),
        "receipt_deadline": (_seconds("2h"), "2h"),
        "outage_after": (_seconds("10m"), "10m"),
    },
    "security": {
        "data_key_file": (_str, "var/data.key"),
        "retention_days": (_at_least(_int, 1, "a whole number of days, at least 1"), 730),
        "foreign_retention_days": (_at_least(_int, 1, "a whole number of days, at least 1"), 30),
    },
    "sightings": {  # tracked devices seen by the attach check (personal data: see README)
        "dedupe": (_seconds("15m"), "15m"),
        "retention_days": (_at_least(_int, 1, "a whole number of days, at least 1"), 90),
        "blocked_attempts": (_bool, False),
        "queue_size": (_at_least(_int, 1, "a whole number, at least 1"), 10000),
        "webhook_url": (_webhook_url, ""),
        "webhook_key": (_str, ""),
    },
    "log": {"format": (_log_format, "kv"), "level": (_log_level, "INFO")},
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
