"""The operator's side of the registry's receipts protocol: acknowledge the applied feed
position, fetch a change's receipt, fetch the member directory (``docs/api/registry.yaml``).

Over ``RegistryClient``'s transport (signed requests, verified answers, its retries and errors);
each answer is also checked for shape, and the JWS it carries must verify with the registry's
key and say the same as the answer, so what is stored can be shown to anyone later.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from imeisync.adapters.registry_client import RegistryAnswerRejected, RegistryClient
from imeisync.adapters.signed_documents import MEMBERS_TYP, RECEIPT_TYP, verify_document
from imeisync.domain.errors import ImeisyncError


@dataclass(frozen=True)
class Receipt:
    change_id: str
    seq: int
    applied: int
    total: int
    complete: bool
    recipients: list[dict[str, Any]]
    payload: dict[str, Any]
    jws: str


@dataclass(frozen=True)
class MemberKey:
    id: str
    country: str
    public_key: Ed25519PublicKey


def acknowledge(client: RegistryClient, applied_through: int) -> dict[str, Any]:
    """POST /v1/acks: we applied the feed through ``applied_through`` (already committed)."""
    response = client._send("POST", "/v1/acks", body={"applied_through": applied_through})
    data = client._verified_json(response)
    if not isinstance(data, dict) or not isinstance(data.get("applied_through"), int):
        raise RegistryAnswerRejected("the ack's answer has no applied_through")
    return data


def fetch_receipt(client: RegistryClient, change_id: str) -> Receipt:
    """GET /v1/changes/{change_id}/receipt, verified twice (HTTP signature and JWS)."""
    response = client._send("GET", f"/v1/changes/{quote(change_id, safe=':')}/receipt")
    data = client._verified_json(response)
    if not isinstance(data, dict) or not isinstance(data.get("jws"), str):
        raise RegistryAnswerRejected("the receipt carries no signed document")
    payload = _verified(data["jws"], client.registry_key, RECEIPT_TYP, "receipt")
    if payload != data.get("receipt") or payload.get("change_id") != change_id:
        raise RegistryAnswerRejected("the signed receipt does not match the answer")
    recipients = payload.get("recipients")
    numbers = [payload.get(n) for n in ("seq", "applied", "total")]
    if (not isinstance(recipients, list) or not all(isinstance(r, dict) for r in recipients)
            or not all(isinstance(n, int) for n in numbers)
            or not isinstance(payload.get("complete"), bool)):
        raise RegistryAnswerRejected("the receipt lacks seq, applied, total or recipients")
    seq, applied, total = numbers
    assert isinstance(seq, int) and isinstance(applied, int) and isinstance(total, int)
    return Receipt(change_id, seq, applied, total, payload["complete"], recipients, payload,
                   data["jws"])


def fetch_members(client: RegistryClient) -> tuple[list[MemberKey], str]:
    """GET /v1/members: the member directory and its signed form (to cache)."""
    response = client._send("GET", "/v1/members")
    data = client._verified_json(response)
    if not isinstance(data, dict) or not isinstance(data.get("jws"), str):
        raise RegistryAnswerRejected("the member directory carries no signed document")
    return parse_members(data["jws"], client.registry_key), data["jws"]


def parse_members(token: str, registry_key: Ed25519PublicKey) -> list[MemberKey]:
    """A signed member directory's members; a bad signature or shape is refused whole."""
    payload = _verified(token, registry_key, MEMBERS_TYP, "member directory")
    members = payload.get("members")
    if not isinstance(members, list):
        raise RegistryAnswerRejected("the member directory lists no members")
    found = []
    for m in members:
        try:
            raw = base64.urlsafe_b64decode(m["public_key"] + "=" * (-len(m["public_key"]) % 4))
            found.append(MemberKey(str(m["id"]), str(m["country"]),
                                   Ed25519PublicKey.from_public_bytes(raw)))
        except (KeyError, TypeError, ValueError):
            raise RegistryAnswerRejected("a member directory entry is malformed") from None
    return found


def _verified(token: str, key: Ed25519PublicKey, typ: str, what: str) -> dict[str, Any]:
    try:
        return verify_document(token, key, typ, what)
    except ImeisyncError as exc:
        raise RegistryAnswerRejected(exc.message) from None
