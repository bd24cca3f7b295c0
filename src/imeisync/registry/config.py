"""The reference registry's configuration: ``[server]`` and one ``[[operators]]`` per member.

Validated like the daemon's configuration (``imeisync.config``): an unknown section or key, a
wrong type, a duplicate member or an unreadable key file is refused at start with one line
naming the file and the key. Relative paths are taken from the file's folder (its parent when
the file lives in ``config/``), so the file works from any working directory.

>>> cfg = parse_registry_config({
...     "server": {"listen": "127.0.0.1:8090", "signing_key": "/k/reg.key", "kid": "reg"},
...     "operators": [{"id": "op-a", "country": "DK", "public_key": "/k/a.pub",
...                    "receives": "country"}],
... }, "registry.toml", Path("/srv"), load_keys=False)
>>> cfg.members["op-a"].receives
'country'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from imeisync.adapters.keys import load_private_key, load_public_key, validate_kid
from imeisync.adapters.rate_limit import check_rate
from imeisync.config import read_toml, resolve_path, resolve_sqlite_url
from imeisync.config_sections import Listen
from imeisync.config_values import check_country, check_listen, check_operator_id
from imeisync.domain.errors import BadInput, ImeisyncError
from imeisync.registry.canary_config import CanaryConfig, parse_canary

DEFAULT_REGISTRY_CONFIG = Path("config/registry.toml")

_SERVER_KEYS = {
    "listen": "127.0.0.1:8090",
    "database_url": "sqlite:///var/registry.db",
    "signing_key": "var/keys/registry.key",
    "kid": "registry",
}
# Limits under load (per worker process): requests per member (after its signature is checked)
# and snapshots streamed at once; ``registry.app`` applies them.
MEMBER_RATE, MAX_SNAPSHOTS = "20/s", 2
_LIMIT_KEYS: dict[str, Any] = {"member_rate": MEMBER_RATE, "max_snapshots": MAX_SNAPSHOTS}
_OPERATOR_KEYS = ("id", "country", "public_key", "receives")


@dataclass(frozen=True)
class Member:
    """One operator the registry knows: who it is, how it signs, whose records it receives."""

    id: str
    country: str
    public_key_path: str
    receives: str | tuple[str, ...]  # "all" | "country" | the operator ids it receives
    public_key: Ed25519PublicKey | None = field(default=None, repr=False, compare=False)

    def receives_from(self, owner_id: str, owner_country: str) -> bool:
        """Whether a record owned by ``owner_id`` reaches this member (its own always do)."""
        if owner_id == self.id or self.receives == "all":
            return True
        if self.receives == "country":
            return owner_country == self.country
        return owner_id in self.receives


@dataclass(frozen=True)
class RegistryConfig:
    listen: str
    database_url: str
    signing_key_path: str
    kid: str
    members: Mapping[str, Member]
    source: str = "(defaults)"
    signing_key: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    canary: CanaryConfig | None = None  # [canary]: none planted without it
    member_rate: str = MEMBER_RATE  # "N/s" | "N/m" | "N/h"
    max_snapshots: int = MAX_SNAPSHOTS

    @property
    def host(self) -> str:
        return Listen.of(self.listen).host

    @property
    def port(self) -> int:
        return Listen.of(self.listen).port


def load_registry_config(path: str | os.PathLike[str], *, load_keys: bool = True) -> RegistryConfig:
    """Read and validate a registry configuration file (it must exist)."""
    file = Path(path)
    if not file.is_file():
        raise BadInput(
            f"registry configuration file {file} does not exist",
            "pass --config REGISTRY.toml; config/registry.example.toml lists every key",
        )
    raw, base_dir = read_toml(file)
    return parse_registry_config(raw, str(file), base_dir, load_keys=load_keys)


def _refuse_unknown_keys(source: str, where: str, table: dict[str, Any],
                         known: Iterable[str]) -> None:
    for key in table:
        if key not in known:
            raise BadInput(f"{source}: unknown key {key!r} in {where}",
                           f"known keys: {', '.join(known)}", code="unknown_key")


def _bad(source: str, where: str, value: Any, expected: str) -> BadInput:
    return BadInput(
        f"{source}: {where} = {value!r} is not valid: expected {expected}", code="bad_value"
    )


def _receives(value: Any, source: str, where: str) -> str | tuple[str, ...]:
    if value == "all" or value == "country":
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        ids = []
        for v in value:
            try:
                ids.append(check_operator_id(v))
            except TypeError as exc:
                raise _bad(source, where, v, str(exc)) from None
        return tuple(ids)
    raise _bad(source, where, value, '"all", "country", or a list of operator ids')


def parse_registry_config(
    raw: Mapping[str, Any], source: str, base_dir: Path, *, load_keys: bool = True
) -> RegistryConfig:
    for section in raw:
        if section not in ("server", "operators", "canary"):
            raise BadInput(
                f"{source}: unknown section [{section}]",
                "a registry file has [server], [[operators]] and [canary] sections",
                code="unknown_key",
            )
    server = raw.get("server", {})
    if not isinstance(server, dict):
        raise BadInput(f"{source}: [server] must be a table of keys")
    _refuse_unknown_keys(source, "[server]", server, [*_SERVER_KEYS, *_LIMIT_KEYS])
    limits = _limits({**_LIMIT_KEYS, **{k: v for k, v in server.items() if k in _LIMIT_KEYS}},
                     source)
    values = {**_SERVER_KEYS, **{k: v for k, v in server.items() if k not in _LIMIT_KEYS}}
    for key, value in values.items():
        if not isinstance(value, str):
            raise _bad(source, f"[server] {key}", value, "a string")
    try:
        listen = check_listen(values["listen"])
    except TypeError as exc:
        raise _bad(source, "[server] listen", values["listen"], str(exc)) from None
    try:
        kid = validate_kid(values["kid"])
    except BadInput:
        raise _bad(source, "[server] kid", values["kid"],
                   "a key id of letters, digits, '.', '_' or '-'") from None
    database_url = resolve_sqlite_url(base_dir, values["database_url"])
    signing_key_path = resolve_path(base_dir, values["signing_key"])

    operators = raw.get("operators", [])
    if not isinstance(operators, list) or not all(isinstance(o, dict) for o in operators):
        raise BadInput(
            f"{source}: operators must be written as [[operators]] tables",
            'add one [[operators]] table per member: id, country, public_key, receives',
        )
    if not operators:
        raise BadInput(
            f"{source}: no [[operators]]: the registry has no members",
            "add one [[operators]] table per member operator",
        )
    members: dict[str, Member] = {}
    for index, body in enumerate(operators, start=1):
        where = f"[[operators]] #{index}"
        _refuse_unknown_keys(source, where, body, _OPERATOR_KEYS)
        missing = [k for k in _OPERATOR_KEYS if k not in body and k != "receives"]
        if missing:
            raise BadInput(f"{source}: {where} lacks {', '.join(missing)}", code="missing_key")
        checked: dict[str, Any] = {}
        for key, parse in (("id", check_operator_id), ("country", check_country)):
            try:
                checked[key] = parse(body[key])
            except TypeError as exc:
                raise _bad(source, f"{where} {key}", body[key], str(exc)) from None
        if not isinstance(body["public_key"], str):
            raise _bad(source, f"{where} public_key", body["public_key"], "a path to a PEM file")
        receives = _receives(body.get("receives", "all"), source, f"{where} receives")
        if checked["id"] in members:
            raise BadInput(f"{source}: operator {checked['id']!r} is listed twice",
                           code="duplicate_member")
        key_path = resolve_path(base_dir, body["public_key"])
        public_key = None
        if load_keys:
            try:
                public_key = load_public_key(Path(key_path))
            except ImeisyncError as exc:
                raise BadInput(f"{source}: {where} ({checked['id']}) public_key: {exc}") from None
        members[checked["id"]] = Member(checked["id"], checked["country"], key_path, receives,
                                        public_key)
    unknown = sorted({r for m in members.values() if isinstance(m.receives, tuple)
                      for r in m.receives} - set(members))
    if unknown:
        raise BadInput(
            f"{source}: receives names operator(s) that are not members: {', '.join(unknown)}",
            code="bad_value",
        )
    signing_key = None
    if load_keys:
        try:
            signing_key = load_private_key(Path(signing_key_path))
        except ImeisyncError as exc:
            raise BadInput(f"{source}: [server] signing_key: {exc}") from None
    canary = (parse_canary(raw["canary"], source, base_dir, load_secret=load_keys)
              if "canary" in raw else None)
    return RegistryConfig(listen, database_url, signing_key_path, kid, members, source,
                          signing_key, canary, **limits)


def _limits(values: dict[str, Any], source: str) -> dict[str, Any]:
    try:
        check_rate(values["member_rate"])
    except TypeError as exc:
        raise _bad(source, "[server] member_rate", values["member_rate"], str(exc)) from None
    snapshots = values["max_snapshots"]
    if not isinstance(snapshots, int) or isinstance(snapshots, bool) or snapshots < 1:
        raise _bad(source, "[server] max_snapshots", snapshots, "a whole number, at least 1")
    return {"member_rate": values["member_rate"].strip(), "max_snapshots": snapshots}
