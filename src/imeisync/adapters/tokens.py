"""API tokens: one per person or system, each with a role, kept only as a hash.

A token is ``isk_`` and 43 characters of base64url (256 random bits). It is shown once, when it
is made (``imeisync token add``); the file at ``[api] tokens_file`` keeps its SHA-256, its name,
role and creation time. A plain hash is enough: the token is random and long, so there is
nothing to guess (a slow password hash protects low-entropy secrets, which these are not).

The file is JSON, written atomically (a temporary file in the same folder, flushed, renamed into
place) with mode 0600 from its first byte, under a lock so two ``token add`` calls cannot lose
each other's token. It also holds the secret that signs web console sessions, so that every
worker process accepts the same sessions and a stolen session cookie is useless once the file's
token is revoked.

Running servers pick up changes by themselves: ``authenticate`` looks at the file's identity
(inode, size, mtime) at most once a second and reloads when it changed, so a revoked token stops
working within a second; ``reload()`` (the daemon calls it on SIGHUP) does it at once. A file
that cannot be read or parsed keeps the previous set in force and is logged.

File format::

    {"version": 1, "session_secret": "<64 hex>",
     "tokens": [{"name": "anna", "role": "liaison", "hash": "sha256:<64 hex>",
                 "created_at": "2026-11-21T10:00:00Z", "created_by": "root"}]}
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imeisync.adapters.files import write_atomic
from imeisync.domain.errors import BadInput, Refused, Unavailable
from imeisync.domain.roles import ROLES
from imeisync.domain.times import rfc3339

log = logging.getLogger(__name__)

PREFIX = "isk_"
MAX_TOKEN_CHARS = 200  # anything longer is not one of ours: refused before hashing
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_CHECK_EVERY = 1.0  # seconds between looks at the file for changes


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenInfo:
    """What is known of a token's holder: never the token itself."""

    name: str
    role: str
    created_at: str
    created_by: str
    hash: str  # "sha256:…"; ``fingerprint`` is its short form for session cookies

    @property
    def fingerprint(self) -> str:
        return self.hash.removeprefix("sha256:")[:16]

    def public(self) -> dict[str, str]:
        return {"name": self.name, "role": self.role, "created_at": self.created_at,
                "created_by": self.created_by}


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not _NAME.fullmatch(name):
        raise BadInput(
            f"token name {name[:70]!r} is not valid",
            "use 1-64 letters, digits and . _ @ - (a person's user id or a system's name)",
            code="bad_token_name",
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise BadInput(f"role {role[:20]!r} is not one of {', '.join(ROLES)}", code="bad_role")
    return role


class TokenStore:
    """The tokens file, loaded lazily and followed for changes."""

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._by_hash: dict[str, TokenInfo] = {}
        self._by_name: dict[str, TokenInfo] = {}
        self._secret: bytes | None = None
        self._ephemeral_secret = secrets.token_bytes(32)  # no file yet: nobody can sign in
        self._identity: tuple[int, int, int] | None = None
        self._loaded = False
        self._checked = 0.0

    # -- reading -------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unavailable(f"tokens file {self.path} cannot be read: {exc}") from None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self) -> int:
        """Read the file now (SIGHUP). Returns the number of tokens; on a bad file the
        previous set stays in force and the error is raised for the caller to log."""
        with self._lock:
            identity = self._stat()
            data = self._read() if identity is not None else {"tokens": []}
            by_hash, by_name = _index(data, self.path)
            secret = data.get("session_secret")
            self._by_hash, self._by_name = by_hash, by_name
            self._secret = bytes.fromhex(secret) if isinstance(secret, str) and secret else None
            self._identity, self._loaded = identity, True
            self._checked = time.monotonic()
            if identity is not None and self.path.stat().st_mode & 0o077:
                log.warning("tokens file %s is readable by group or others; chmod 600 it",
                            self.path)
            return len(by_name)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"tokens": []}
        except (OSError, UnicodeDecodeError) as exc:
            raise Unavailable(f"tokens file {self.path} cannot be read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise BadInput(f"tokens file {self.path} is not valid JSON: {exc}",
                           "restore it from a backup, or remove it and add the tokens again"
                           ) from None
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise BadInput(f"tokens file {self.path} has no token list")
        return data

    def _fresh(self) -> None:
        """Reload when the file changed (looked at most once a second)."""
        now = time.monotonic()
        if self._loaded and now - self._checked < _CHECK_EVERY:
            return
        self._checked = now
        try:
            if not self._loaded or self._stat() != self._identity:
                self.reload()
        except (BadInput, Unavailable) as exc:
            if not self._loaded:
                raise
            log.error("tokens file changed but cannot be loaded; the previous tokens stay in "
                      "force: %s", exc)

    def authenticate(self, presented: str | None) -> TokenInfo | None:
        """The holder of ``presented``, or None (no such token, revoked, malformed)."""
        if not presented or len(presented) > MAX_TOKEN_CHARS or not presented.isascii():
            return None
        self._fresh()
        return self._by_hash.get(hash_token(presented))

    def get(self, name: str) -> TokenInfo | None:
        self._fresh()
        return self._by_name.get(name)

    def list(self) -> list[TokenInfo]:
        self._fresh()
        return sorted(self._by_name.values(), key=lambda t: (t.created_at, t.name))

    @property
    def session_secret(self) -> bytes:
        self._fresh()
        return self._secret or self._ephemeral_secret

    # -- writing -------------------------------------------------------------------------

    def add(self, name: str, role: str, *, created_by: str) -> tuple[str, TokenInfo]:
        """Make a token for ``name``; returns (the token — show it once —, its info)."""
        name, role = check_name(name), check_role(role)
        token = new_token()
        with self._locked():
            data = self._read()
            if any(isinstance(t, dict) and t.get("name") == name for t in data["tokens"]):
                raise Refused(f"a token named {name} exists already",
                              f"revoke it first (`imeisync token revoke {name}`) or choose "
                              "another name", code="token_exists")
            entry = {"name": name, "role": role, "hash": hash_token(token),
                     "created_at": rfc3339(self.clock()),
                     "created_by": created_by[:128]}
            data["tokens"].append(entry)
            data.setdefault("session_secret", secrets.token_hex(32))
            self._write(data)
        self.reload()
        info = self._by_name[name]
        return token, info

    def revoke(self, name: str) -> TokenInfo:
        with self._locked():
            data = self._read()
            kept = [t for t in data["tokens"]
                    if not (isinstance(t, dict) and t.get("name") == name)]
            if len(kept) == len(data["tokens"]):
                raise Refused(f"no token named {name[:70]!r}",
                              "see the names with `imeisync token list`", code="no_token")
            removed = next(t for t in data["tokens"] if isinstance(t, dict)
                           and t.get("name") == name)
            data["tokens"] = kept
            self._write(data)
        self.reload()
        return _info(removed, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / (self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise Unavailable(f"cannot write the tokens file in {folder}: {exc}",
                              "check [api] tokens_file and the folder's permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, data: dict[str, Any]) -> None:
        data["version"] = 1
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        try:
            write_atomic(self.path, text.encode("utf-8"), mode=0o600)
        except OSError as exc:
            raise Unavailable(f"cannot write the tokens file {self.path}: {exc}",
                              "check [api] tokens_file and the folder's permissions") from None


def _info(entry: Any, path: Path) -> TokenInfo:
    if not isinstance(entry, dict):
        raise BadInput(f"tokens file {path}: an entry is not an object")
    try:
        return TokenInfo(name=str(entry["name"]), role=str(entry["role"]),
                         created_at=str(entry.get("created_at", "")),
                         created_by=str(entry.get("created_by", "")), hash=str(entry["hash"]))
    except KeyError as exc:
        raise BadInput(f"tokens file {path}: an entry lacks {exc.args[0]!r}") from None


def _index(data: dict[str, Any], path: Path) -> tuple[dict[str, TokenInfo], dict[str, TokenInfo]]:
    by_hash: dict[str, TokenInfo] = {}
    by_name: dict[str, TokenInfo] = {}
    for entry in data["tokens"]:
        info = _info(entry, path)
        if info.role not in ROLES:
            log.warning("tokens file %s: token %s has unknown role %r; ignored", path,
                        info.name, info.role)
            continue
        by_hash[info.hash] = info
        by_name[info.name] = info
    return by_hash, by_name
