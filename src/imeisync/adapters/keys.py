"""Ed25519 key pairs as PEM files: operators, the registry and police authorities.

A key pair is two files named after its key id (``kid``):

- ``<kid>.key`` — the private key, PKCS#8 PEM, unencrypted, mode 0600;
- ``<kid>.pub`` — the public key, SubjectPublicKeyInfo PEM, mode 0644.

Keys are never overwritten: a second ``generate_keypair`` with the same kid is refused, so an
operator cannot lose the key its peers trust by a slip of the command line. Loading names the file
and says what is wrong with it (missing, unreadable, not PEM, encrypted, not Ed25519).

>>> import tempfile
>>> out = Path(tempfile.mkdtemp())
>>> private_path, public_path = generate_keypair("police-ke-1", out)
>>> private_path.name, public_path.name
('police-ke-1.key', 'police-ke-1.pub')
>>> key = load_private_key(private_path)
>>> load_public_key(public_path).public_bytes_raw() == key.public_key().public_bytes_raw()
True
>>> import shutil; shutil.rmtree(out)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from imeisync.adapters.files import write_atomic
from imeisync.domain.errors import BadInput, Refused, Unavailable
from imeisync.domain.fields import OPERATOR_ID

__all__ = [
    "KID_PATTERN",
    "PRIVATE_SUFFIX",
    "PUBLIC_SUFFIX",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "validate_kid",
]

#: A key id: also a file name, so no slashes, no leading dot, at most 64 characters. An
#: operator's key id is its operator id, so both follow one pattern.
KID_PATTERN = OPERATOR_ID
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"

_MAX_KEY_FILE_BYTES = 64 * 1024


def validate_kid(kid: str) -> str:
    """Return ``kid`` if it is a usable key id, else raise :class:`BadInput`.

    >>> validate_kid("op-ke-01")
    'op-ke-01'
    >>> validate_kid("../etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    imeisync.domain.errors.BadInput: key id '../etc/passwd' is not valid — ...
    """
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise BadInput(
            f"key id {kid!r} is not valid",
            "use 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (it becomes the file name)",
            code="bad_kid",
        )
    return kid


def generate_keypair(kid: str, out_dir: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as ``<out_dir>/<kid>.key`` and ``<out_dir>/<kid>.pub``.

    Creates ``out_dir`` if it is missing. Returns ``(private_path, public_path)``.

    :raises BadInput: the kid is not valid.
    :raises Refused: either file already exists (keys are never overwritten).
    :raises Unavailable: the directory cannot be created or written.
    """
    validate_kid(kid)
    out_dir = Path(out_dir)
    private_path = out_dir / f"{kid}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{kid}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise _refuse_overwrite(path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Unavailable(
            f"cannot create key directory {out_dir}: {err.strerror or err}",
            "choose a writable --out directory",
        ) from err

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    _write_new_file(private_path, private_pem, 0o600)
    try:
        _write_new_file(public_path, public_pem, 0o644)
    except BaseException:
        # Leave no half pair behind: a private key without its public half is only confusing.
        with contextlib.suppress(OSError):
            private_path.unlink()
        raise
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 private key.

    :raises BadInput: the file is missing, unreadable, not PEM, encrypted, or not Ed25519.
    """
    path = Path(path)
    data = _read_key_file(path, "private key")
    if b"-----BEGIN PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise BadInput(
            f"{path} holds a public key, not a private key",
            f"pass the matching {PRIVATE_SUFFIX} file",
            code="bad_key_file",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:  # the PEM is encrypted and we passed no password
        raise BadInput(
            f"private key {path} is encrypted",
            "imeisync needs an unencrypted PKCS#8 PEM key; protect it with file permissions "
            "(chmod 600) instead",
            code="bad_key_file",
        ) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise BadInput(
            f"{path} is not a PEM private key",
            "expected '-----BEGIN PRIVATE KEY-----' (PKCS#8), as written by 'imeisync keygen'",
            code="bad_key_file",
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(
            f"private key {path} is {_key_kind(key)}, not Ed25519",
            "make an Ed25519 key pair with 'imeisync keygen --kid KID --out DIR'",
            code="bad_key_file",
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a SubjectPublicKeyInfo PEM Ed25519 public key.

    :raises BadInput: the file is missing, unreadable, not PEM, or not Ed25519.
    """
    path = Path(path)
    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise BadInput(
            f"{path} holds a private key where a public key is expected",
            f"pass the {PUBLIC_SUFFIX} file, and keep the private key out of shared directories",
            code="bad_key_file",
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise BadInput(
            f"{path} is not a PEM public key",
            "expected '-----BEGIN PUBLIC KEY-----' (SubjectPublicKeyInfo), as written by "
            "'imeisync keygen'",
            code="bad_key_file",
        ) from err
    if not isinstance(key, Ed25519PublicKey):
        raise BadInput(
            f"public key {path} is {_key_kind(key)}, not Ed25519",
            "ask its owner for an Ed25519 public key (PEM, SubjectPublicKeyInfo)",
            code="bad_key_file",
        )
    return key


# --------------------------------------------------------------------------- helpers


def _refuse_overwrite(path: Path) -> Refused:
    return Refused(
        f"{path} already exists; keys are never overwritten",
        "choose another --kid or --out directory, or move the old key pair away first",
        code="key_exists",
    )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte (never wider, any umask), whole or
    not at all, and never over an existing file."""
    try:
        written = write_atomic(path, data, mode=mode, replace=False)
    except OSError as err:
        raise Unavailable(
            f"cannot write {path}: {err.strerror or err}",
            "choose a writable --out directory with free space",
        ) from err
    if not written:
        raise _refuse_overwrite(path)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if path.is_dir():
            raise BadInput(
                f"{what} {path} is a directory, not a key file",
                "pass the path of a PEM file",
                code="bad_key_file",
            )
        size = path.stat().st_size
        if size > _MAX_KEY_FILE_BYTES:
            raise BadInput(
                f"{what} file {path} is {size} bytes, far too large for a PEM key",
                "check that the path names the key file",
                code="bad_key_file",
            )
        return path.read_bytes()
    except FileNotFoundError as err:
        raise BadInput(
            f"{what} file {path} does not exist",
            "check the path, or make a key pair with 'imeisync keygen --kid KID --out DIR'",
            code="bad_key_file",
        ) from err
    except OSError as err:
        raise BadInput(
            f"cannot read {what} file {path}: {err.strerror or err}",
            "check the file's permissions",
            code="bad_key_file",
        ) from err


def _key_kind(key: object) -> str:
    kinds: list[tuple[tuple[type, ...], str]] = [
        ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA key"),
        ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an EC (ECDSA) key"),
        ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "a DSA key"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448 key"),
        ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "an X25519 key"),
        ((x448.X448PrivateKey, x448.X448PublicKey), "an X448 key"),
    ]
    for classes, kind in kinds:
        if isinstance(key, classes):
            return kind
    return f"a {type(key).__name__}"
