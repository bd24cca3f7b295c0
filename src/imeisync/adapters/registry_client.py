"""The operator's client for the central registry (protocol: ``docs/api/registry.yaml``).

``requests`` with ``urllib3`` retries for connection errors and a ``RetryPolicy`` for 429/502/
503/504 (``registry_retry.py``; every call is idempotent: changes by ``change_id``, disputes by
``dispute_id``), a timeout on every call. Requests are signed (RFC 9421, Ed25519, ``keyid`` =
``[registry] kid``); every answer the registry gives is verified against
``[registry] registry_public_key`` before anything in it is believed, and checked for shape.

Failures are the three imeisync errors, one line each, and the caller changes nothing:

- ``Unavailable`` (exit 3) — unreachable, timed out, 5xx/429 after the retries, or an answer
  that cannot be trusted (bad or missing signature, malformed JSON, sequence numbers going
  backwards, a snapshot cut off). ``RegistryAnswerRejected`` is that last kind.
- ``Refused`` (exit 1) — the registry refused us (401 signature/membership, 403, 404, 409, 422).
- ``BadInput`` (exit 2) — the registry says our request is malformed (400, 413).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from imeisync.adapters.http_signatures import (
    InvalidSignature,
    OperatorAuth,
    verify_response,
    verify_response_headers,
    verify_snapshot_trailer,
)
from imeisync.adapters.registry_feed import (
    Change,
    DisputeAnswerEntry,
    DisputeEntry,
    FeedPage,
    RegistryAnswerRejected,
    SightingEntry,
    parse_feed_page,
)
from imeisync.adapters.registry_retry import RetryPolicy
from imeisync.domain.errors import BadInput, Refused, Unavailable

__all__ = [
    "Change",
    "DisputeAnswerEntry",
    "DisputeEntry",
    "FeedPage",
    "RegistryAnswerRejected",
    "RegistryClient",
    "SightingEntry",
    "SnapshotFile",
]

_RESULTS = ("accepted", "duplicate", "rejected")
SNAPSHOT_HEADER = b"imei,owner,country,kind,reason,seq,at,imei_last\n"
_TRAILER = re.compile(
    rb"#end records=(\d+) seq=(\d+) sha256=([0-9a-f]{64}) sig=([A-Za-z0-9+/=]+)\n?"
)


@dataclass(frozen=True)
class SnapshotFile:
    """A verified snapshot on disk: ``SNAPSHOT_HEADER``, then ``records`` lines, no trailer."""

    path: Path
    seq: int
    records: int


class RegistryClient:
    def __init__(
        self,
        base_url: str,
        *,
        signing_key: Ed25519PrivateKey,
        kid: str,
        registry_key: Ed25519PublicKey,
        timeout: tuple[float, float] = (5.0, 30.0),
        retries: int = 3,
        backoff: float = 0.5,
        retry_after_max: int = 30,
        session: requests.Session | None = None,
        policy: RetryPolicy | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.kid = kid
        self.registry_key = registry_key
        self.timeout = timeout
        self.auth = OperatorAuth(signing_key, kid)
        self.session = session or requests.Session()
        self.policy = policy or RetryPolicy(retries=retries, backoff=backoff,
                                            retry_after_max=retry_after_max)
        retry = Retry(  # connection errors only; statuses: ``policy`` (registry_retry.py)
            total=retries, connect=retries, read=retries, status=0, other=0,
            backoff_factor=backoff, backoff_max=10, allowed_methods=frozenset({"GET", "POST"}),
            raise_on_status=False, raise_on_redirect=False,
        )
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    # -- transport -----------------------------------------------------------------------

    def _send(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None
              = None, stream: bool = False, timeout: tuple[float, float] | None = None,
              ) -> requests.Response:
        url = f"{self.base_url}{path}"
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = self.policy.send(lambda: self.session.request(
                method, url, data=data, params=params, headers=headers, auth=self.auth,
                timeout=timeout or self.timeout, stream=stream, allow_redirects=False))
        except requests.Timeout:
            raise Unavailable(f"registry {self.base_url} did not answer in time ({method} "
                              f"{path})", "try again later; nothing was changed",
                              code="registry_timeout") from None
        except requests.RequestException as exc:
            raise Unavailable(f"registry {self.base_url} unreachable: {_reason(exc)}",
                              "check [registry] url and the network; nothing was changed",
                              code="registry_unreachable") from None
        if response.status_code >= 300:
            self._raise_for(response, method, path)
        return response

    def _raise_for(self, response: requests.Response, method: str, path: str) -> None:
        status = response.status_code
        detail = ""
        try:
            data = json.loads(response.content[:65536])
            if isinstance(data, dict):
                detail = str(data.get("detail") or data.get("title") or "")
                hint = data.get("hint")
                if isinstance(hint, str) and hint:
                    detail = f"{detail} — {hint}"
                detail = detail[:300]
                code = data.get("code")
                if isinstance(code, str) and code:
                    detail = f"{detail} (code {code[:16]})"
        except (ValueError, UnicodeDecodeError):
            detail = ""
        finally:
            response.close()
        where = f"{method} {path}"
        said = f": {detail}" if detail else ""
        if status == 401:
            raise Refused(f"registry refused our signature on {where}{said}",
                          "check [registry] kid (your operator id at the registry), "
                          "signing_key, and that the clock is right", code="registry_auth")
        if status in (400, 413):
            raise BadInput(f"registry says {where} is malformed (HTTP {status}){said}",
                           code="registry_bad_request")
        if status in (403, 404, 409, 422):
            raise Refused(f"registry refused {where} (HTTP {status}){said}",
                          code="registry_refused")
        retry_after = response.headers.get("Retry-After")
        hint = (f"the registry asks to wait {retry_after[:20]} s; the next scheduled run "
                "tries again" if retry_after else "try again later; nothing was changed")
        raise Unavailable(f"registry {self.base_url} answered HTTP {status} to {where}{said}",
                          hint, code="registry_unavailable")

    def _verified_json(self, response: requests.Response) -> Any:
        try:
            body = verify_response(response, self.registry_key)
        except InvalidSignature as exc:
            raise RegistryAnswerRejected(f"its signature does not verify ({exc})",
                                         "check [registry] registry_public_key; someone may be "
                                         "between us and the registry") from None
        except requests.RequestException as exc:
            raise Unavailable(f"registry answer cut off: {_reason(exc)}",
                              code="registry_unreachable") from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryAnswerRejected(f"signed, but not JSON ({exc})") from None

    # -- protocol ------------------------------------------------------------------------

    def push(self, changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST /v1/changes; the per-change results, checked to answer exactly this batch."""
        response = self._send("POST", "/v1/changes", body={"changes": changes})
        return _results_for(self._verified_json(response), changes, "change_id")

    def push_sightings(self, notices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST /v1/sightings; the per-notice results, checked to answer exactly this batch."""
        response = self._send("POST", "/v1/sightings", body={"sightings": notices})
        return _results_for(self._verified_json(response), notices, "notice_id")

    def feed_page(self, after: int, limit: int) -> FeedPage:
        """GET /v1/changes?after=&limit=, verified and checked entry by entry."""
        response = self._send("GET", "/v1/changes", params={"after": after, "limit": limit})
        return parse_feed_page(self._verified_json(response), after, limit)

    def file_dispute(self, dispute: dict[str, Any]) -> dict[str, Any]:
        response = self._send("POST", "/v1/disputes", body=dispute)
        data = self._verified_json(response)
        if not isinstance(data, dict) or data.get("dispute_id") != dispute["dispute_id"]:
            raise RegistryAnswerRejected("the answer does not describe the dispute filed")
        return data

    def answer_dispute(self, dispute_id: str, answer: str, reason: str) -> dict[str, Any]:
        response = self._send("POST", f"/v1/disputes/{dispute_id}/answer",
                              body={"answer": answer, "reason": reason})
        data = self._verified_json(response)
        if not isinstance(data, dict) or data.get("dispute_id") != dispute_id:
            raise RegistryAnswerRejected("the answer does not describe the dispute answered")
        return data

    def snapshot(self, spool: Path) -> SnapshotFile:
        """GET /v1/snapshot, streamed to ``spool`` while hashing; returns only once the
        closing line's signature verified. A snapshot cut off, tampered with or malformed
        raises, and ``spool`` is removed."""
        response = self._send("GET", "/v1/snapshot", stream=True,
                              timeout=(self.timeout[0], max(self.timeout[1], 60.0)))
        try:
            try:
                header_signature = verify_response_headers(response, self.registry_key)
            except InvalidSignature as exc:
                raise RegistryAnswerRejected(f"the snapshot's signature does not verify ({exc})"
                                             ) from None
            seq_text = response.headers.get("Snapshot-Seq", "")
            if not seq_text.isdigit():
                raise RegistryAnswerRejected("the snapshot has no Snapshot-Seq header")
            seq = int(seq_text)
            digest = hashlib.sha256()
            with open(spool, "wb") as out:
                lines, trailer = _spool_body(response, out, digest)
            if trailer is None:
                raise RegistryAnswerRejected(
                    "the snapshot ended without its closing line (cut off in the middle?)")
            match = _TRAILER.fullmatch(trailer)
            if not match:
                raise RegistryAnswerRejected("the snapshot's closing line is malformed")
            records, trailer_seq = int(match.group(1)), int(match.group(2))
            sha256_hex, signature = match.group(3).decode(), match.group(4).decode()
            if sha256_hex != digest.hexdigest() or records != lines - 1 or trailer_seq != seq:
                raise RegistryAnswerRejected(
                    "the snapshot's content does not match its closing line (cut off or "
                    "altered)")
            try:
                verify_snapshot_trailer(self.registry_key, header_signature, sha256_hex,
                                        records, seq, signature)
            except InvalidSignature as exc:
                raise RegistryAnswerRejected(str(exc)) from None
            return SnapshotFile(spool, seq, records)
        except requests.RequestException as exc:
            spool.unlink(missing_ok=True)
            raise Unavailable(f"snapshot download cut off: {_reason(exc)}",
                              "nothing was changed; try again", code="registry_unreachable"
                              ) from None
        except BaseException:
            spool.unlink(missing_ok=True)
            raise
        finally:
            response.close()


def _results_for(data: Any, sent: list[dict[str, Any]], id_name: str) -> list[dict[str, Any]]:
    """A batch answer's per-item results, checked to answer exactly ``sent``, in order."""
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or len(results) != len(sent):
        raise RegistryAnswerRejected("the results do not answer the batch sent")
    for item, result in zip(sent, results, strict=True):
        if not isinstance(result, dict) or result.get(id_name) != item[id_name]:
            raise RegistryAnswerRejected("the results do not answer the batch sent")
        if result.get("result") not in _RESULTS:
            raise RegistryAnswerRejected(f"unknown result {str(result.get('result'))[:20]!r}")
        if result["result"] == "rejected" and not isinstance(result.get("code"), str):
            raise RegistryAnswerRejected("a rejection without a code")
    return results


def _spool_body(response: requests.Response, out: Any, digest: Any) -> tuple[int, bytes | None]:
    """Copy the body's record lines to ``out`` (hashing them) block by block; return the
    number of lines and the closing ``#end`` line (None when the body ended before it)."""
    pending = b""
    trailer: bytes | None = None
    lines = 0
    for chunk in response.iter_content(chunk_size=1 << 20):
        if trailer is not None:
            trailer += chunk
            if len(trailer) > 4096:
                raise RegistryAnswerRejected("the snapshot goes on after its closing line")
            continue
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if cut == 0:
            continue
        block, pending = pending[:cut], pending[cut:]
        if lines == 0 and not block.startswith(SNAPSHOT_HEADER):
            raise RegistryAnswerRejected("the snapshot does not start with its column line")
        start = 0 if block.startswith(b"#") else block.find(b"\n#") + 1
        if start > 0 or block.startswith(b"#"):
            block, trailer, pending = block[:start], block[start:] + pending, b""
        digest.update(block)
        out.write(block)
        lines += block.count(b"\n")
    return lines, trailer


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Max retries exceeded", "Read timed out",
                   "Connection reset", "IncompleteRead", "Name or service not known"):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__

