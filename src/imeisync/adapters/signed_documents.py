"""Documents signed as compact JWS (Ed25519) that are kept and checked later, offline:
the registry's apply receipts and member directory, operators' lift notices.

One rule for all of them: the header names the document type (``typ``) and the signer (``kid``);
a token of another type, with another algorithm, or whose signature does not verify is refused
with one line, never half-read. The payload is a JSON object.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

from imeisync.domain.errors import BadInput, Refused

RECEIPT_TYP = "imeisync-receipt+jws"
MEMBERS_TYP = "imeisync-members+jws"
NOTICE_TYP = "imeisync-notice+jws"
MAX_DOCUMENT = 1024 * 1024

_REGISTRY = JWSRegistry(algorithms=["Ed25519"], strict_check_header=False)
_REGISTRY.max_payload_length = MAX_DOCUMENT


def sign_document(payload: dict[str, Any], key: Ed25519PrivateKey, kid: str, typ: str) -> str:
    """``payload`` as a compact JWS signed by ``key`` (``alg`` Ed25519, RFC 9864)."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return jws.serialize_compact({"alg": "Ed25519", "kid": kid, "typ": typ}, body.encode(),
                                 OKPKey.import_key(key), registry=_REGISTRY)


def document_header(token: str, typ: str, what: str) -> dict[str, Any]:
    """The header of a ``typ`` document (not yet verified): to find who claims to sign it."""
    if not isinstance(token, str) or len(token) > MAX_DOCUMENT * 2 or token.count(".") != 2:
        raise BadInput(f"the {what} is not a compact JWS (three dot-separated parts)",
                       "give the file exactly as it was written; it may be truncated",
                       code="malformed_document")
    part = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise BadInput(f"the {what}'s header is not base64url JSON", code="malformed_document"
                       ) from None
    if not isinstance(header, dict) or header.get("typ") != typ:
        raise BadInput(f"this is not a {what} (its type is {str(header.get('typ'))[:40]!r} "
                       f"where {typ!r} is expected)" if isinstance(header, dict)
                       else f"the {what}'s header is not a JSON object",
                       code="malformed_document")
    if header.get("alg") != "Ed25519" or not isinstance(header.get("kid"), str):
        raise Refused(f"the {what} must be signed with Ed25519 and name its signer (kid)",
                      code="bad_signature")
    return header


def verify_document(token: str, key: Ed25519PublicKey, typ: str, what: str) -> dict[str, Any]:
    """The payload of a ``typ`` document whose signature verifies with ``key``.

    :raises BadInput: not a document of this type (truncated, malformed, another type).
    :raises Refused: the signature does not verify (altered, or signed by another key).
    """
    token = token.strip() if isinstance(token, str) else token
    document_header(token, typ, what)
    try:
        verified = jws.deserialize_compact(token, OKPKey.import_key(key), registry=_REGISTRY)
    except JoseError as exc:
        if exc.error == "bad_signature":
            raise Refused(f"the {what}'s signature does not verify: it was altered or signed "
                          "with another key", code="bad_signature") from None
        raise BadInput(f"the {what} is malformed ({exc.description or exc.error})",
                       code="malformed_document") from None
    except ValueError as exc:
        raise BadInput(f"the {what} is malformed ({exc})", code="malformed_document") from None
    try:
        payload = json.loads(verified.payload)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(f"the {what}'s payload is not JSON", code="malformed_document") from None
    if not isinstance(payload, dict):
        raise BadInput(f"the {what}'s payload is not a JSON object", code="malformed_document")
    return payload
