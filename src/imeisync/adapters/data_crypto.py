"""Notes encrypted at rest with AES-256-GCM and a key file.

Liaison notes are free text and may carry personal data (a victim's name, a phone number), so the
store keeps them only as tokens::

    v1.<key id>.<nonce, base64url>.<ciphertext and tag, base64url>

- ``key id`` is the first 8 hex digits of SHA-256 of the key: it says which key to decrypt with,
  without revealing it.
- ``nonce`` is 96 random bits, new for every encryption.
- The caller's ``context`` (the record id or order id the note belongs to) is bound as AES-GCM
  associated data, so a ciphertext copied onto another row does not decrypt.

The key file
------------
One base64-encoded 256-bit key per line; blank lines and lines starting with ``#`` are ignored.
It must not be readable or writable by group or others (``chmod 600``), or it is refused. With
``create=True`` a missing file is created with a fresh key, atomically and with mode 0600 from its
first byte (temporary file in the same directory, then linked into place; a concurrent creator's
key wins and is used, never overwritten).

Rotation: the FIRST key is the current one and encrypts; every key in the file is tried, by key
id, to decrypt. To rotate, put a new key on a new first line (:func:`rotate_key_file` does this)
and keep the old lines until every note has been re-encrypted or purged by retention; then delete
them.

>>> cipher = DataCipher([bytes(32)])
>>> token = cipher.encrypt("reported by the owner at the shop", context="order:42")
>>> token.startswith("v1." + cipher.key_id + ".")
True
>>> cipher.decrypt(token, context="order:42")
'reported by the owner at the shop'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from imeisync.adapters.files import write_atomic
from imeisync.domain.errors import BadInput, Refused, Unavailable

__all__ = [
    "KEY_BYTES",
    "TOKEN_VERSION",
    "DataCipher",
    "is_encrypted",
    "key_id_of",
    "rotate_key_file",
]

KEY_BYTES = 32
TOKEN_VERSION = "v1"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_AAD_PREFIX = b"imeisync/note/v1\x00"
_MAX_KEY_FILE_BYTES = 64 * 1024
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def key_id_of(key: bytes) -> str:
    """The public name of a key: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


def is_encrypted(value: str) -> bool:
    """Whether ``value`` looks like a token from :meth:`DataCipher.encrypt` (shape only)."""
    parts = value.split(".") if isinstance(value, str) else []
    return len(parts) == 4 and parts[0] == TOKEN_VERSION and len(parts[1]) == 8


class DataCipher:
    """Encrypts and decrypts short texts with the keys of one key file (first key current)."""

    def __init__(self, keys: Sequence[bytes], *, source: Path | None = None) -> None:
        if not keys:
            raise BadInput(
                f"data key file {source} holds no key" if source else "no data key given",
                "put one base64 256-bit key per line, or delete the file to have one made",
                code="bad_data_key",
            )
        for key in keys:
            if len(key) != KEY_BYTES:
                raise BadInput(
                    f"a data key is {len(key)} bytes, not {KEY_BYTES}",
                    "use 256-bit keys",
                    code="bad_data_key",
                )
        self._source = source
        self._root = bytes(keys[0])  # digests derive their own keys from it (``digest``)
        self._digest_keys: dict[str, bytes] = {}
        self._current = AESGCM(keys[0])
        self._key_id = key_id_of(keys[0])
        self._by_id: dict[str, list[AESGCM]] = {}
        seen: set[bytes] = set()
        for key in keys:
            if key not in seen:
                seen.add(key)
                self._by_id.setdefault(key_id_of(key), []).append(AESGCM(key))

    @classmethod
    def from_key_file(cls, path: Path, create: bool = True) -> DataCipher:
        """Load the keys in ``path``; with ``create``, make the file with a new key if missing.

        :raises Refused: the file is readable or writable by group or others.
        :raises BadInput: the file is missing (and ``create`` is false), unreadable or corrupt.
        :raises Unavailable: the file cannot be created.
        """
        path = Path(path)
        if create and not path.exists() and not path.is_symlink():
            _create_key_file(path, [_new_key()])
        return cls(_read_key_file(path), source=path)

    @property
    def key_id(self) -> str:
        """The id of the current (encrypting) key."""
        return self._key_id

    @property
    def key_ids(self) -> list[str]:
        """Ids of every key that can decrypt."""
        return list(self._by_id)

    def encrypt(self, plaintext: str, *, context: str) -> str:
        """Encrypt ``plaintext`` bound to ``context``; returns a ``v1.…`` token."""
        aad = _aad(context)
        try:
            data = plaintext.encode("utf-8")
        except (AttributeError, UnicodeEncodeError) as err:
            raise BadInput(
                "the note is not valid text", "send the note as UTF-8 text", code="bad_note"
            ) from err
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._current.encrypt(nonce, data, aad)
        return ".".join((TOKEN_VERSION, self._key_id, _b64e(nonce), _b64e(sealed)))

    def decrypt(self, token: str, *, context: str) -> str:
        """Decrypt a token made by :meth:`encrypt` with the same ``context``.

        :raises BadInput: the token is malformed, its key is not in the key file, or it was
            altered or belongs to another context ("note cannot be decrypted: …").
        """
        aad = _aad(context)
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 4 or parts[0] != TOKEN_VERSION:
            raise _undecryptable(
                f"it is not an imeisync encrypted note (expected {TOKEN_VERSION}.<key id>."
                "<nonce>.<ciphertext>)"
            )
        _, key_id, nonce_b64, sealed_b64 = parts
        try:
            nonce = _b64d(nonce_b64)
            sealed = _b64d(sealed_b64)
        except ValueError as err:
            raise _undecryptable("its nonce or ciphertext is not base64url") from err
        if len(nonce) != _NONCE_BYTES or len(sealed) < _TAG_BYTES:
            raise _undecryptable("its nonce or ciphertext has the wrong length; truncated?")
        candidates = self._by_id.get(key_id)
        if not candidates:
            where = f" in {self._source}" if self._source else ""
            raise _undecryptable(
                f"it was encrypted with key {key_id!r}, which is not{where}",
                "restore that key as a later line of the data key file",
            )
        for aes in candidates:
            try:
                data = aes.decrypt(nonce, sealed, aad)
            except InvalidTag:
                continue
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as err:  # pragma: no cover - we only encrypt UTF-8
                raise _undecryptable("its plaintext is not UTF-8") from err
        raise _undecryptable("it was altered, or it belongs to another record (context mismatch)")

    def digest(self, value: str, *, purpose: str) -> str:
        """A keyed hash of ``value`` (HMAC-SHA256, hex): equal values give equal digests, and
        without the data key nobody can test a guess (an IMSI has too few digits for an unkeyed
        hash to hide it). The HMAC key is derived from the current data key with HKDF, one per
        ``purpose``, so the AES key itself never serves as an HMAC key. After a key rotation the
        same value digests differently: digests serve short-lived comparisons only.

        >>> cipher = DataCipher([bytes(32)])
        >>> cipher.digest("238010000000001", purpose="imsi") == cipher.digest(
        ...     "238010000000001", purpose="imsi")
        True
        >>> cipher.digest("238010000000001", purpose="imsi") == cipher.digest(
        ...     "238010000000001", purpose="other")
        False
        """
        key = self._digest_keys.get(purpose)
        if key is None:
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=b"imeisync/digest/v1\x00" + purpose.encode()).derive(self._root)
            self._digest_keys[purpose] = key
        return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return f"DataCipher(key_id={self._key_id!r}, keys={len(self._by_id)})"


def rotate_key_file(path: Path) -> str:
    """Put a new current key on the first line of ``path``, keeping the old keys after it.

    The file is replaced atomically and keeps mode 0600. Returns the new key id.
    """
    path = Path(path)
    old = _read_key_file(path)
    new = _new_key()
    _create_key_file(path, [new, *old], replace=True)
    return key_id_of(new)


# --------------------------------------------------------------------------- helpers


def _aad(context: str) -> bytes:
    if not isinstance(context, str) or not context:
        raise BadInput(
            "an encrypted note needs a context (the id of the row it belongs to)",
            "pass context=<record or order id>",
            code="bad_note",
        )
    return _AAD_PREFIX + context.encode("utf-8", "surrogatepass")


def _undecryptable(detail: str, hint: str | None = None) -> BadInput:
    return BadInput(
        f"note cannot be decrypted: {detail}",
        hint or "check that the row was not edited by hand and that the data key file is right",
        code="undecryptable_note",
    )


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error as err:
        raise ValueError("not base64url") from err


def _new_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def _read_key_file(path: Path) -> list[bytes]:
    try:
        st = path.stat()
    except FileNotFoundError as err:
        raise BadInput(
            f"data key file {path} does not exist",
            "restore it from backup, or fix [security] data_key_file",
            code="bad_data_key",
        ) from err
    except OSError as err:
        raise _unreadable(path, err) from err
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(
            f"data key file {path} is not a regular file",
            "point [security] data_key_file at a file",
            code="bad_data_key",
        )
    if os.name == "posix" and st.st_mode & 0o077:
        raise Refused(
            f"data key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
            f"run 'chmod 600 {path}'",
            code="data_key_permissions",
        )
    if st.st_size > _MAX_KEY_FILE_BYTES:
        raise BadInput(
            f"data key file {path} is {st.st_size} bytes, far too large for a key file",
            "check that [security] data_key_file names the key file",
            code="bad_data_key",
        )
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as err:
        raise _corrupt(path, "it is not ASCII text") from err
    except OSError as err:
        raise _unreadable(path, err) from err
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except binascii.Error as err:
            raise _corrupt(path, f"line {number} is not base64") from err
        if len(key) != KEY_BYTES:
            raise _corrupt(path, f"line {number} holds {len(key)} bytes, not a 256-bit key")
        keys.append(key)
    if not keys:
        raise _corrupt(path, "it holds no key")
    return keys


def _unreadable(path: Path, err: OSError) -> BadInput:
    return BadInput(
        f"cannot read data key file {path}: {err.strerror or err}",
        "check the file's permissions",
        code="bad_data_key",
    )


def _corrupt(path: Path, detail: str) -> BadInput:
    return BadInput(
        f"data key file {path} is corrupt: {detail}",
        "restore it from backup; each line must be one base64 256-bit key",
        code="bad_data_key",
    )


def _create_key_file(path: Path, keys: Sequence[bytes], *, replace: bool = False) -> None:
    """Write ``keys`` to ``path`` atomically with mode 0600 from the first byte.

    Without ``replace``, an existing file (a concurrent creator's) is kept, never overwritten.
    """
    body = "".join(base64.b64encode(key).decode("ascii") + "\n" for key in keys)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, body.encode("ascii"), mode=0o600, replace=replace)
    except OSError as err:
        raise Unavailable(
            f"cannot write data key file {path}: {err.strerror or err}",
            "make its directory writable with free space, or fix [security] data_key_file",
        ) from err
