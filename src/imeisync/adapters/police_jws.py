"""Police orders as signed JWS (compact serialisation), Ed25519 only.

A police authority signs the order's JSON object with its Ed25519 key; the header names the
algorithm and the key::

    {"alg": "Ed25519", "kid": "police-ke-1", "typ": "imeisync-order+jws"}

``alg`` is ``Ed25519`` (RFC 9864, fully specified) or the older ``EdDSA`` (RFC 8037) with an
Ed25519 key; nothing else is accepted — not ``none``, not HMAC (``HS*``: an attacker could use the
*public* key as the shared secret), not RSA or ECDSA. ``kid`` must name a file ``<kid>.pub`` in the
trusted-keys directory (CONTRACT: "the file name is the kid"). ``typ`` is optional; when present
it must say this is an imeisync order (``imeisync-order+jws``, with or without ``application/``,
or the generic ``JOSE``), so that a JWT the same authority signed for some other purpose cannot be
replayed as an order.

How a token is refused — an explicit decision:

- **Structural garbage is BadInput** (HTTP 400, exit 2): not text, not ASCII, over 64 kB, not three
  base64url parts, truncated, a header that is not a JSON object, a ``crit`` or unencoded-payload
  (``b64: false``) extension, a payload that is not a JSON object. The sender must fix the input;
  codes ``malformed_jws`` and ``malformed_payload``.
- **A well-formed token that a rule says no to is Refused** (HTTP 422, exit 1): an algorithm other
  than Ed25519/EdDSA (``unsupported_alg``), a missing or untrusted ``kid`` (``unknown_kid``), a
  signature that does not verify (``bad_signature``). The input parsed; the police must re-sign or
  we must be given their key.

The payload is checked for the signature and for being a JSON object with unique keys, nothing
more: the order's fields are the domain layer's business.

The cryptography is joserfc's (:func:`joserfc.jws.deserialize_compact`) with a registry that knows
only the two accepted algorithms; we parse the header ourselves first only to give precise
messages and to choose the key by ``kid`` from our own directory — the token never chooses its
key (``jwk``/``jku``/``x5c`` headers are ignored).

:class:`TrustedKeys` loads the directory once; :meth:`TrustedKeys.reload` re-reads it (the daemon
calls it on SIGHUP) and swaps the whole set atomically, so a verification in flight sees either
the old set or the new one, and a failed reload leaves the old set in place.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from joserfc import jws
from joserfc.errors import (
    BadSignatureError,
    DecodeError,
    ExceededSizeError,
    InvalidKeyCurveError,
    InvalidKeyTypeError,
    JoseError,
    UnsupportedAlgorithmError,
)
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

from imeisync.adapters.keys import (
    PUBLIC_SUFFIX,
    load_private_key,
    load_public_key,
    validate_kid,
)
from imeisync.domain.errors import BadInput, Refused

__all__ = [
    "ACCEPTED_ALGS",
    "MAX_TOKEN_BYTES",
    "ORDER_TYP",
    "TrustedKeys",
    "VerifiedOrder",
    "sign_order",
    "verify_order",
]

#: The only JWS algorithms an order may use: RFC 9864's fully specified name first.
ACCEPTED_ALGS: tuple[str, ...] = ("Ed25519", "EdDSA")
#: The ``typ`` header sign_order writes.
ORDER_TYP = "imeisync-order+jws"
#: Orders are a few hundred bytes; anything over this is refused before it is parsed.
MAX_TOKEN_BYTES = 64 * 1024

_ACCEPTED_TYPS = frozenset({ORDER_TYP, f"application/{ORDER_TYP}", "jose", "application/jose"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_ED25519_SIGNATURE_BYTES = 64
_ACCEPTED_TEXT = " or ".join(f"'{alg}'" for alg in ACCEPTED_ALGS)


class _OrderRegistry(JWSRegistry):
    """A joserfc registry that knows only Ed25519 and EdDSA.

    joserfc's default registry allows only "recommended" algorithms, which excludes ``EdDSA``;
    passing ``algorithms=[...]`` works but its ``get_alg`` then emits a ``SecurityWarning``
    ("EdDSA is deprecated via RFC 9864") on every verification. Accepting EdDSA is a deliberate
    CONTRACT decision, so we allow-list here instead.
    """

    max_header_length = 8 * 1024  # joserfc's 512 is too tight for x5c chains police tools add
    max_payload_length = MAX_TOKEN_BYTES
    max_signature_length = 1024

    def get_alg(self, name: str) -> JWSAlgModel:
        if name not in ACCEPTED_ALGS or name not in self.algorithms:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        return self.algorithms[name]


# RFC 7515 §4: header parameters we do not understand are ignored unless listed in "crit";
# joserfc's strict mode would refuse them instead. We refuse "crit" ourselves.
_REGISTRY = _OrderRegistry(algorithms=list(ACCEPTED_ALGS), strict_check_header=False)


@dataclass(frozen=True)
class VerifiedOrder:
    """An order whose police signature verified: who signed it, how, and what it says."""

    kid: str
    alg: str
    payload: dict[str, Any] = field(hash=False)


class TrustedKeys(Mapping[str, Ed25519PublicKey]):
    """The police authorities' public keys: every ``<kid>.pub`` file in one directory.

    A read-only mapping kid → public key. Load with :meth:`load`; :meth:`reload` re-reads.
    """

    def __init__(self, directory: Path, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self._directory = Path(directory)
        self._keys: dict[str, Ed25519PublicKey] = dict(keys)

    @classmethod
    def load(cls, directory: Path) -> TrustedKeys:
        """Read every ``*.pub`` in ``directory``.

        :raises BadInput: the directory is missing or unreadable, or a key file is bad (named).
        """
        directory = Path(directory)
        return cls(directory, _read_key_directory(directory))

    def reload(self) -> None:
        """Re-read the directory and replace the whole set at once.

        On any error the old set stays in force and the error is raised for the caller to log.
        """
        self._keys = _read_key_directory(self._directory)

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustedKeys({str(self._directory)!r}, kids={self.kids!r})"


def sign_order(
    payload: dict[str, Any], private_key_path: Path, kid: str, alg: str = "Ed25519"
) -> str:
    """Sign an order as a compact JWS with the Ed25519 key in ``private_key_path``.

    The header is ``{"alg": alg, "kid": kid, "typ": "imeisync-order+jws"}``.

    :raises BadInput: bad kid or alg, a payload that is not a JSON-serialisable object, a bad key
        file, or an order too large to be accepted.
    """
    validate_kid(kid)
    if alg not in ACCEPTED_ALGS:
        raise BadInput(
            f"cannot sign with algorithm {alg!r}",
            f"orders are signed with {_ACCEPTED_TEXT}",
            code="unsupported_alg",
        )
    if not isinstance(payload, dict):
        raise BadInput(
            f"an order must be a JSON object, not {_json_type(payload)}",
            'write the order as {"order_id": ..., "kind": ..., ...}',
            code="malformed_payload",
        )
    try:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BadInput(
            f"the order cannot be written as JSON: {err}",
            "use only strings, numbers, booleans, null, lists and objects",
            code="malformed_payload",
        ) from err
    key = OKPKey.import_key(load_private_key(Path(private_key_path)))
    header = {"alg": alg, "kid": kid, "typ": ORDER_TYP}
    token = jws.serialize_compact(header, body.encode("utf-8"), key, registry=_REGISTRY)
    if len(token) > MAX_TOKEN_BYTES:
        raise BadInput(
            f"the signed order is {len(token)} bytes, over the {MAX_TOKEN_BYTES}-byte limit",
            "keep notes and free text short",
            code="malformed_payload",
        )
    return token


def verify_order(token: str | bytes, trusted: TrustedKeys) -> VerifiedOrder:
    """Check a compact JWS police order against the trusted keys and return its payload.

    Surrounding whitespace (a trailing newline from a file) is ignored.

    :raises BadInput: the token or its payload is malformed (codes ``malformed_jws``,
        ``malformed_payload``).
    :raises Refused: unsupported algorithm, missing/unknown kid, or a signature that does not
        verify (codes ``unsupported_alg``, ``unknown_kid``, ``bad_signature``).
    """
    text = _as_text(token)
    header_b64, payload_b64, signature_b64 = _split(text)
    header = _decode_header(header_b64)
    alg = _check_alg(header)
    _check_extensions(header)
    kid = _check_kid(header, trusted)
    if not payload_b64:
        raise _malformed("its payload part is empty (detached payloads are not accepted)")
    _b64url_decode(payload_b64, "payload")
    signature = _b64url_decode(signature_b64, "signature")
    if len(signature) != _ED25519_SIGNATURE_BYTES:
        raise _malformed(
            f"its signature is {len(signature)} bytes where an Ed25519 signature has "
            f"{_ED25519_SIGNATURE_BYTES}; the token looks truncated"
        )

    key = OKPKey.import_key(trusted[kid])
    try:
        verified = jws.deserialize_compact(text, key, registry=_REGISTRY)
    except BadSignatureError as err:
        raise Refused(
            "the police signature does not verify: the order was altered or signed with "
            "another key",
            f"ask the police authority to sign the order again with key {kid!r}",
            code="bad_signature",
        ) from err
    except UnsupportedAlgorithmError as err:  # pragma: no cover - _check_alg decides first
        raise _unsupported_alg(alg) from err
    except (InvalidKeyTypeError, InvalidKeyCurveError) as err:  # pragma: no cover - Ed25519 only
        raise Refused(
            f"trusted key {kid!r} cannot verify {alg} signatures",
            "the trusted key file must hold an Ed25519 public key",
            code="bad_signature",
        ) from err
    except (DecodeError, ExceededSizeError, JoseError) as err:
        raise _malformed(err.description or err.error or type(err).__name__) from err

    return VerifiedOrder(kid=kid, alg=alg, payload=_decode_payload(verified.payload))


# --------------------------------------------------------------------------- parsing steps


def _malformed(detail: str) -> BadInput:
    return BadInput(
        f"not a JWS compact serialisation: {detail}",
        "send the signed order exactly as the police tool produced it "
        "(header.payload.signature, base64url)",
        code="malformed_jws",
    )


def _unsupported_alg(alg: object) -> Refused:
    shown = "no 'alg'" if alg is None else f"alg {alg!r}"
    return Refused(
        f"the order is signed with {shown}; only {_ACCEPTED_TEXT} (Ed25519 keys) are accepted",
        "ask the police authority to sign with its Ed25519 key",
        code="unsupported_alg",
    )


def _as_text(token: str | bytes) -> str:
    if isinstance(token, (bytes, bytearray, memoryview)):
        raw = bytes(token)
        if len(raw) > MAX_TOKEN_BYTES:
            raise _too_large(len(raw))
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError as err:
            raise _malformed("it is not ASCII text") from err
    if not isinstance(token, str):
        raise _malformed(f"expected text, got {type(token).__name__}")
    if len(token) > MAX_TOKEN_BYTES:
        raise _too_large(len(token))
    token = token.strip()
    if not token.isascii():
        raise _malformed("it contains characters that are not ASCII")
    if not token:
        raise _malformed("it is empty")
    return token


def _too_large(size: int) -> BadInput:
    return BadInput(
        f"not a JWS compact serialisation: {size} bytes is over the {MAX_TOKEN_BYTES}-byte "
        "limit for an order",
        "send one signed order, not a file or an archive",
        code="malformed_jws",
    )


def _split(text: str) -> tuple[str, str, str]:
    parts = text.split(".")
    if len(parts) != 3:
        raise _malformed(
            f"expected three base64url parts separated by '.', found {len(parts)}"
            + ("; the token looks truncated" if len(parts) < 3 else "")
        )
    names = ("header", "payload", "signature")
    for name, part in zip(names, parts, strict=True):
        if not _B64URL.fullmatch(part):
            raise _malformed(f"its {name} part contains characters outside base64url")
    if not parts[0]:
        raise _malformed("its header part is empty")
    return parts[0], parts[1], parts[2]


def _b64url_decode(part: str, name: str) -> bytes:
    """Strict unpadded base64url: only canonical encodings (no spare bits) are accepted."""
    if len(part) % 4 == 1:
        raise _malformed(f"its {name} part has an impossible base64url length; truncated?")
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as err:
        raise _malformed(f"its {name} part is not base64url") from err
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != part:
        raise _malformed(f"its {name} part is not canonical base64url; truncated?")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _loads_object(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)


def _decode_header(header_b64: str) -> dict[str, Any]:
    return _json_object(_b64url_decode(header_b64, "header"), _malformed, "its header")


def _check_alg(header: Mapping[str, Any]) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ACCEPTED_ALGS:
        raise _unsupported_alg(alg)
    return alg


def _check_extensions(header: Mapping[str, Any]) -> None:
    if "crit" in header:
        raise _malformed(
            f"it requires header extensions {header['crit']!r} ('crit'), which imeisync "
            "does not support"
        )
    if "b64" in header and header["b64"] is not True:
        raise _malformed("unencoded payloads ('b64': false) are not accepted")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPS):
        raise _malformed(
            f"its typ {typ!r} says it is not an imeisync order (expected {ORDER_TYP!r})"
        )


def _check_kid(header: Mapping[str, Any], trusted: TrustedKeys) -> str:
    kid = header.get("kid")
    if kid is None:
        raise Refused(
            "the order's header names no key ('kid'), so its signer cannot be identified",
            "ask the police authority to sign with a key id (the name of its .pub file)",
            code="unknown_kid",
        )
    if not isinstance(kid, str):
        raise _malformed(f"its kid is {_json_type(kid)}, not a string")
    if kid not in trusted:
        held = "" if len(trusted) else " (the directory holds none)"
        raise Refused(
            f"the order is signed with key {kid!r}, which is not among the trusted police "
            f"keys in {trusted.directory}{held}",
            "ask the police authority for its public key or check the kid",
            code="unknown_kid",
        )
    return kid


def _decode_payload(raw: bytes) -> dict[str, Any]:
    return _json_object(raw, _bad_payload, "it")


def _json_object(raw: bytes, bad: Callable[[str], BadInput], subject: str) -> dict[str, Any]:
    """``raw`` as a JSON object, or ``bad("<subject> is not ...")`` saying why not."""
    try:
        value = _loads_object(raw)
    except UnicodeDecodeError as err:
        raise bad(f"{subject} is not UTF-8 text") from err
    except ValueError as err:  # JSONDecodeError, duplicate keys
        raise bad(f"{subject} is not valid JSON ({err})") from err
    except RecursionError as err:
        raise bad(f"{subject} is nested too deeply") from err
    if not isinstance(value, dict):
        raise bad(f"{subject} is {_json_type(value)}, not a JSON object")
    return value


def _bad_payload(detail: str) -> BadInput:
    return BadInput(
        f"the signed order's payload is not a JSON object: {detail}",
        "the police tool must sign the order's JSON object itself",
        code="malformed_payload",
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- key directory


def _read_key_directory(directory: Path) -> dict[str, Ed25519PublicKey]:
    if not directory.exists():
        raise BadInput(
            f"the trusted police keys directory {directory} does not exist",
            "create it and put each police authority's <kid>.pub file in it, or fix "
            "[police] trusted_keys",
            code="bad_trusted_keys",
        )
    if not directory.is_dir():
        raise BadInput(
            f"the trusted police keys path {directory} is not a directory",
            "set [police] trusted_keys to a directory of <kid>.pub files",
            code="bad_trusted_keys",
        )
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
    except OSError as err:
        raise BadInput(
            f"cannot read the trusted police keys directory {directory}: {err.strerror or err}",
            "check its permissions",
            code="bad_trusted_keys",
        ) from err
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        if path.is_dir():
            continue
        kid = path.name[: -len(PUBLIC_SUFFIX)]
        if not kid:
            raise BadInput(
                f"trusted key file {path} has no name before {PUBLIC_SUFFIX}",
                "name each file <kid>.pub, the kid the police authority signs with",
                code="bad_trusted_keys",
            )
        keys[kid] = load_public_key(path)
    return keys
