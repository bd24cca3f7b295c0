"""RFC 9421 HTTP Message Signatures (Ed25519) for the registry protocol, both directions.

The signing and verifying is ``http-message-signatures`` / ``requests-http-signature``; this
module only fixes the profile both ends use:

- **requests** (operator → registry) cover ``@method``, ``@authority``, ``@target-uri`` and
  ``content-digest`` (RFC 9530, SHA-256; present on every request, even an empty GET body), with
  ``created`` and ``keyid`` (the operator id) and ``alg="ed25519"``;
- **responses** (registry → operator) cover ``@status``, the request's ``@method``,
  ``@authority`` and ``@target-uri`` (``;req``: a response cannot be replayed for another
  request) and ``content-digest``; a streamed snapshot covers its ``snapshot-seq`` header
  instead and carries its digest in its last line (see ``docs/api/registry.yaml``);
- a signature must be at most ``MAX_AGE`` old, with ``CLOCK_SKEW`` tolerance for clocks ahead.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

import requests
from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from requests.structures import CaseInsensitiveDict
from requests_http_signature import HTTPSignatureAuth

ALGORITHM = algorithms.ED25519
MAX_AGE = dt.timedelta(minutes=5)
CLOCK_SKEW = dt.timedelta(seconds=30)
REQUEST_COMPONENTS = ("@method", "@authority", "@target-uri")
RESPONSE_COMPONENTS = ("@status", '"@method";req', '"@authority";req', '"@target-uri";req')
SNAPSHOT_COMPONENTS = (*RESPONSE_COMPONENTS, "content-type", "snapshot-seq")
SNAPSHOT_CONTEXT = b"imeisync-snapshot-v1\n"

__all__ = [
    "ALGORITHM",
    "InvalidSignature",
    "OperatorAuth",
    "keyid_of",
    "sign_response",
    "snapshot_trailer_signature",
    "verify_request",
    "verify_response",
    "verify_response_headers",
    "verify_snapshot_trailer",
]


class _Verifier(HTTPMessageVerifier):
    max_clock_skew = CLOCK_SKEW


class _Resolver(HTTPSignatureKeyResolver):
    def __init__(
        self,
        public: Callable[[str], Ed25519PublicKey | None] | None = None,
        private: Ed25519PrivateKey | None = None,
    ):
        self._public = public
        self._private = private

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
        key = self._public(key_id) if self._public else None
        if key is None:
            raise InvalidSignature(f"unknown key id {key_id[:64]!r}")
        return key

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        if self._private is None:
            raise InvalidSignature("no private key")
        return self._private


class _Request:
    """A request as the component resolver wants it: method, absolute URL, headers."""

    def __init__(self, method: str, url: str, headers: Mapping[str, str]):
        self.method = method.upper()
        self.url = url
        self.headers = CaseInsensitiveDict(headers)


class _Response:
    def __init__(self, status: int, headers: Mapping[str, str], request: _Request):
        self.status_code = status
        self.headers = CaseInsensitiveDict(headers)
        self.request = request


class _VerifierAuth(HTTPSignatureAuth):
    verifier_class = _Verifier


class OperatorAuth(HTTPSignatureAuth):
    """``requests`` auth: signs every request with the operator's key (``keyid`` = its id)."""

    def __init__(self, private_key: Ed25519PrivateKey, key_id: str):
        super().__init__(
            signature_algorithm=ALGORITHM,
            key_id=key_id,
            key_resolver=_Resolver(private=private_key),
            covered_component_ids=REQUEST_COMPONENTS,
        )


def keyid_of(headers: Mapping[str, str]) -> str | None:
    """The ``keyid`` a request claims (unverified), for messages: who said it."""
    text = CaseInsensitiveDict(headers).get("signature-input", "")
    marker = 'keyid="'
    start = text.find(marker)
    if start < 0:
        return None
    end = text.find('"', start + len(marker))
    return text[start + len(marker) : end][:64] if end > 0 else None


def verify_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    public_key: Callable[[str], Ed25519PublicKey | None],
) -> str:
    """Verify a signed request (body digest included); return the verified ``keyid``.

    :raises InvalidSignature: missing, malformed, stale, unknown key, or not matching.
    """
    message = _Request(method, url, headers)
    verifier = _Verifier(signature_algorithm=ALGORITHM, key_resolver=_Resolver(public_key))
    try:
        results = verifier.verify(
            message, max_age=MAX_AGE, require_components=(*REQUEST_COMPONENTS, "content-digest"),
            body=body,
        )
    except HTTPMessageSignaturesException as exc:
        raise InvalidSignature(str(exc)) from exc
    if len(results) != 1:
        raise InvalidSignature("exactly one signature is expected")
    return str(results[0].parameters["keyid"])


def sign_response(
    request_method: str,
    request_url: str,
    request_headers: Mapping[str, str],
    status: int,
    headers: dict[str, str],
    body: bytes | None,
    key: Ed25519PrivateKey,
    kid: str,
) -> dict[str, str]:
    """Sign a response; returns ``headers`` with Content-Digest (for a body) and signatures.

    ``body=None`` is a streamed body: the signature covers ``SNAPSHOT_COMPONENTS`` instead.
    """
    response = _Response(status, headers, _Request(request_method, request_url, request_headers))
    signer = HTTPMessageSigner(signature_algorithm=ALGORITHM, key_resolver=_Resolver(private=key))
    components = RESPONSE_COMPONENTS if body is not None else SNAPSHOT_COMPONENTS
    signer.sign(response, key_id=kid, created=dt.datetime.now(dt.UTC),
                covered_component_ids=components, body=body, label="reg")
    return dict(response.headers)


def verify_response(response: requests.Response, public_key: Ed25519PublicKey) -> bytes:
    """Verify a buffered registry response and its body digest; return the verified body."""
    try:
        result = _VerifierAuth.verify(
            response, signature_algorithm=ALGORITHM,
            key_resolver=_Resolver(lambda _kid: public_key),
            require_components=(*RESPONSE_COMPONENTS, "content-digest"), max_age=MAX_AGE,
        )
    except HTTPMessageSignaturesException as exc:
        raise InvalidSignature(str(exc)) from exc
    if result.body is None:
        raise InvalidSignature("the response body is not covered by its signature")
    return result.body


def verify_response_headers(response: requests.Response, public_key: Ed25519PublicKey) -> bytes:
    """Verify a streamed response's header signature; return its raw ``Signature`` value."""
    verifier = _Verifier(signature_algorithm=ALGORITHM,
                         key_resolver=_Resolver(lambda _kid: public_key))
    try:
        results = verifier.verify(response, max_age=MAX_AGE, require_components=SNAPSHOT_COMPONENTS)
    except HTTPMessageSignaturesException as exc:
        raise InvalidSignature(str(exc)) from exc
    if len(results) != 1:
        raise InvalidSignature("exactly one signature is expected")
    return response.headers["Signature"].encode("ascii")


def _trailer_message(header_signature: bytes, sha256_hex: str, records: int, seq: int) -> bytes:
    return (SNAPSHOT_CONTEXT + header_signature + b"\n"
            + f"{sha256_hex}\n{records}\n{seq}".encode("ascii"))


def snapshot_trailer_signature(
    key: Ed25519PrivateKey, header_signature: bytes, sha256_hex: str, records: int, seq: int
) -> str:
    """The last line's signature: binds the body's digest to the signed response headers."""
    signature = key.sign(_trailer_message(header_signature, sha256_hex, records, seq))
    return base64.b64encode(signature).decode("ascii")


def verify_snapshot_trailer(
    public_key: Ed25519PublicKey, header_signature: bytes, sha256_hex: str, records: int,
    seq: int, signature_b64: str,
) -> None:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(signature, _trailer_message(header_signature, sha256_hex, records, seq))
    except (ValueError, CryptoInvalidSignature) as exc:
        raise InvalidSignature("the snapshot's closing signature does not verify") from exc


def headers_dict(items: Any) -> dict[str, str]:
    """ASGI/Starlette headers as a plain dict (repeated names joined with ', ')."""
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out
