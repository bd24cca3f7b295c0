"""The registry's ``[canary]`` section: the TACs canary records are drawn from, the secret the
per-member keys are derived from, and how many canaries each member receives.

Kept apart from ``registry/config.py`` so that file only learns that the section exists.

>>> c = parse_canary({"tacs": ["01234500"], "secret_file": "s"}, "r.toml", Path("/srv"),
...                  load_secret=False)
>>> c.tacs, c.per_member, c.secret_file
(('01234500',), 5, '/srv/s')
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imeisync.adapters.files import write_atomic
from imeisync.config import resolve_path
from imeisync.domain.errors import BadInput, Refused

_KEYS = ("tacs", "secret_file", "per_member")
_TAC = re.compile(r"[0-9]{8}")
_SECRET = re.compile(r"[0-9a-f]{64}")
MAX_PER_MEMBER = 100


@dataclass(frozen=True)
class CanaryConfig:
    """``tacs``: 8-digit TACs the registry operator keeps to itself (long-retired models);
    ``secret``: the canary secret (32 bytes), never sent or logged."""

    tacs: tuple[str, ...]
    secret_file: str
    per_member: int = 5
    secret: bytes = field(default=b"", repr=False, compare=False)


def _bad(source: str, key: str, value: Any, expected: str) -> BadInput:
    return BadInput(f"{source}: [canary] {key} = {str(value)[:80]!r} is not valid: expected "
                    f"{expected}", code="bad_value")


def parse_canary(raw: Any, source: str, base_dir: Path, *,
                 load_secret: bool = True) -> CanaryConfig:
    if not isinstance(raw, dict):
        raise BadInput(f"{source}: [canary] must be a table of keys")
    for key in raw:
        if key not in _KEYS:
            raise BadInput(f"{source}: unknown key {key!r} in [canary]",
                           f"known keys: {', '.join(_KEYS)}", code="unknown_key")
    tacs = raw.get("tacs")
    if (not isinstance(tacs, list) or not tacs
            or not all(isinstance(t, str) and _TAC.fullmatch(t) for t in tacs)):
        raise _bad(source, "tacs", tacs, 'a non-empty list of 8-digit TACs, e.g. ["01234500"]')
    if len(set(tacs)) != len(tacs):
        raise _bad(source, "tacs", tacs, "each TAC once")
    secret_file = raw.get("secret_file")
    if not isinstance(secret_file, str) or not secret_file:
        raise _bad(source, "secret_file", secret_file,
                   "the path of the canary secret (imeisync registry canary secret --out FILE)")
    per_member = raw.get("per_member", 5)
    if (not isinstance(per_member, int) or isinstance(per_member, bool)
            or not 1 <= per_member <= MAX_PER_MEMBER):
        raise _bad(source, "per_member", per_member, f"a whole number from 1 to {MAX_PER_MEMBER}")
    path = resolve_path(base_dir, secret_file)
    secret = read_secret(Path(path), source) if load_secret else b""
    return CanaryConfig(tuple(tacs), path, per_member, secret)


def read_secret(path: Path, source: str) -> bytes:
    """The 32-byte secret from its file (64 hex digits); refused if others may read it."""
    hint = f"make one with `imeisync registry canary secret --out {path}`"
    try:
        st = path.stat()
        text = path.read_bytes()[:200].decode("ascii").strip() if st.st_size < 200 else ""
    except FileNotFoundError:
        raise BadInput(f"{source}: [canary] secret_file {path} does not exist", hint,
                       code="bad_canary_secret") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{source}: [canary] secret_file {path} cannot be read: {exc}", hint,
                       code="bad_canary_secret") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise Refused(f"{source}: [canary] secret_file {path} is accessible by group or others "
                      f"(mode {stat.S_IMODE(st.st_mode):04o})", f"run 'chmod 600 {path}'",
                      code="canary_secret_permissions")
    if not _SECRET.fullmatch(text):
        raise BadInput(f"{source}: [canary] secret_file {path} does not hold 64 hex digits",
                       hint, code="bad_canary_secret")
    return bytes.fromhex(text)


def new_secret(path: Path) -> None:
    """Write a new canary secret (mode 0600); never overwrites one (it would orphan the
    canaries already sent)."""
    try:
        written = write_atomic(path, (secrets.token_hex(32) + "\n").encode("ascii"),
                               mode=0o600, replace=False)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}",
                       "choose a folder you can write to") from None
    if not written:
        raise Refused(f"{path} exists; a canary secret is never overwritten",
                      "keep it (the canaries already sent were drawn with it) or pick another "
                      "path", code="exists")
