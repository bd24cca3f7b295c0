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
from collections.abc import Callable
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
from imeisync.adapters.registry_retry import RetryPolicy
from imeisync.domain import fields
from imeisync.domain.errors import BadInput, Refused, Unavailable
from imeisync.domain.fields import (
    CASE_REF,
    LIFT_REASONS,
    OPENING_REASONS,
    REASON,
    REFERENCE_ID,
    operator_id,
    text,
)
from imeisync.domain.imei import is_key
from imeisync.domain.orders import parse_timestamp
from imeisync.domain.ranges import parse_wire_device

__all__ = [
    "Change",
    "DisputeAnswerEntry",
    "DisputeEntry",
    "FeedPage",
    "RegistryAnswerRejected",
    "RegistryClient",
    "SnapshotFile",
]

_RESULTS = ("accepted", "duplicate", "rejected")
SNAPSHOT_HEADER = b"imei,owner,country,kind,reason,seq,at,imei_last\n"
_TRAILER = re.compile(
    rb"#end records=(\d+) seq=(\d+) sha256=([0-9a-f]{64}) sig=([A-Za-z0-9+/=]+)\n?"
)


class RegistryAnswerRejected(Unavailable):
    """The registry answered, but the answer cannot be trusted or understood; nothing applied."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(
            f"registry answer rejected: {message}",
            hint or "nothing was applied; if it persists, ask the registry's operators",
            code="registry_answer_rejected",
        )


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    change_id: str
    action: str  # insert | remove
    imei_key: str
    kind: str  # block | track
    reason: str
    at: str
    owner_id: str
    owner_country: str
    imei_key_last: str | None = None  # a range: imei_key..imei_key_last


@dataclass(frozen=True, slots=True)
class DisputeEntry:
    seq: int
    dispute_id: str
    imei_key: str
    owner_id: str
    owner_country: str
    filer_id: str
    filer_country: str
    case_ref: str
    reason: str
    at: str


@dataclass(frozen=True, slots=True)
class DisputeAnswerEntry:
    seq: int
    dispute_id: str
    imei_key: str
    owner_id: str
    owner_country: str
    answer: str  # lifted | upheld
    reason: str
    at: str


Entry = Change | DisputeEntry | DisputeAnswerEntry


@dataclass(frozen=True)
class FeedPage:
    after: int
    next: int
    head: int
    more: bool
    entries: list[Entry]
    skipped: int = 0  # entries of a type this client does not know (newer registry)


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
        data = self._verified_json(response)
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or len(results) != len(changes):
            raise RegistryAnswerRejected("the results do not answer the batch sent")
        for sent, result in zip(changes, results, strict=True):
            if not isinstance(result, dict) or result.get("change_id") != sent["change_id"]:
                raise RegistryAnswerRejected("the results do not answer the batch sent")
            if result.get("result") not in _RESULTS:
                raise RegistryAnswerRejected(f"unknown result {str(result.get('result'))[:20]!r}")
            if result["result"] == "rejected" and not isinstance(result.get("code"), str):
                raise RegistryAnswerRejected("a rejection without a code")
        return results

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


# -- checking a feed page ------------------------------------------------------------------


def _bad(index: int, message: str) -> RegistryAnswerRejected:
    return RegistryAnswerRejected(f"feed entry #{index + 1}: {message}")


def _text(entry: dict[str, Any], name: str, index: int, limit: int = 2000) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(index, f"{name} missing or not text")
    return value


def _field(index: int, check: Callable[..., str], *args: Any) -> str:
    """A field rule of ``domain.fields``, its refusal naming the feed entry."""
    try:
        return check(*args)
    except BadInput as error:
        raise _bad(index, error.message) from None


def _owner(entry: dict[str, Any], index: int, name: str = "owner",
           country: str = "country") -> tuple[str, str]:
    return (_field(index, operator_id, entry.get(name), name),
            _field(index, fields.country, entry.get(country), country))


def _key(entry: dict[str, Any], index: int) -> str:
    key = entry.get("imei")
    if not is_key(key):
        raise _bad(index, f"imei {str(key)[:20]!r} is not a 14-digit IMEI key")
    return key


def _at(entry: dict[str, Any], index: int) -> str:
    at = _text(entry, "at", index, 40)
    try:
        parse_timestamp(at, "at")
    except BadInput:
        raise _bad(index, f"at {at!r} is not an RFC 3339 time") from None
    return at


def parse_feed_page(data: Any, after: int, limit: int) -> FeedPage:
    """Check a feed page completely before anything of it is applied."""
    if not isinstance(data, dict):
        raise RegistryAnswerRejected("the feed page is not a JSON object")
    entries_raw = data.get("entries")
    nxt, head, more = data.get("next"), data.get("head"), data.get("more")
    if not isinstance(entries_raw, list) or len(entries_raw) > limit:
        raise RegistryAnswerRejected("the feed page has no entry list, or more than asked for")
    if data.get("after") != after:
        raise RegistryAnswerRejected(f"asked for changes after {after}, got a page after "
                                     f"{str(data.get('after'))[:20]}")
    if (not isinstance(nxt, int) or isinstance(nxt, bool) or not isinstance(head, int)
            or not isinstance(more, bool)):
        raise RegistryAnswerRejected("the feed page lacks next/head/more")
    entries: list[Entry] = []
    last = after
    skipped = 0
    for index, entry in enumerate(entries_raw):
        if not isinstance(entry, dict):
            raise _bad(index, "not a JSON object")
        seq = entry.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise _bad(index, "seq missing")
        if seq <= last:
            raise RegistryAnswerRejected(
                f"sequence numbers go backwards or repeat ({seq} after {last})",
                "the feed position was not moved; if it persists, ask the registry's operators")
        last = seq
        kind = entry.get("type")
        if kind == "change":
            change_id = _text(entry, "change_id", index, 80)
            if not REFERENCE_ID.fullmatch(change_id):
                raise _bad(index, "change_id is malformed")
            action = entry.get("action")
            if action not in ("insert", "remove"):
                raise _bad(index, f"action {str(action)[:16]!r} is not insert or remove")
            record_kind = entry.get("kind", "block")
            if record_kind not in ("block", "track"):
                raise _bad(index, f"kind {str(record_kind)[:16]!r} is not block or track")
            reason = _text(entry, "reason", index, 32)
            if reason not in (OPENING_REASONS if action == "insert" else LIFT_REASONS):
                raise _bad(index, f"reason {reason!r} is not known for {action}")
            owner, country = _owner(entry, index)
            try:
                key, key_last = parse_wire_device(entry)
            except BadInput as error:
                raise _bad(index, error.message) from None
            entries.append(Change(seq, change_id, action, key, record_kind,
                                  reason, _at(entry, index), owner, country, key_last))
        elif kind == "dispute":
            owner, country = _owner(entry, index)
            filer, filer_country = _owner(entry, index, "filer", "filer_country")
            entries.append(DisputeEntry(
                seq, _text(entry, "dispute_id", index, 80), _key(entry, index), owner, country,
                filer, filer_country, _field(index, text, entry.get("case_ref"), CASE_REF),
                _field(index, text, entry.get("reason"), REASON), _at(entry, index)))
        elif kind == "dispute_answer":
            owner, country = _owner(entry, index)
            answer = entry.get("answer")
            if answer not in ("lifted", "upheld"):
                raise _bad(index, "answer is not lifted or upheld")
            entries.append(DisputeAnswerEntry(
                seq, _text(entry, "dispute_id", index, 80), _key(entry, index), owner, country,
                answer, _field(index, text, entry.get("reason"), REASON), _at(entry, index)))
        elif isinstance(kind, str):
            skipped += 1  # a newer registry's entry type: not ours to apply
        else:
            raise _bad(index, "type missing")
    if nxt < last or nxt < after or head < nxt:
        raise RegistryAnswerRejected(
            f"the page's next position {nxt} is behind its entries or ahead of head {head}")
    return FeedPage(after, nxt, head, more, entries, skipped)
