"""Bad input the sync must survive, changing nothing: a registry that times out, refuses
connections, fails, throttles, signs wrongly or not at all, sends malformed or inconsistent
pages, or cuts a snapshot off. The registry is played by ``responses``; the store is real."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from imeisync.adapters.http_signatures import sign_response, snapshot_trailer_signature
from imeisync.adapters.registry_client import (
    SNAPSHOT_HEADER,
    RegistryAnswerRejected,
    RegistryClient,
)
from imeisync.domain.errors import BadInput, Refused, Unavailable
from imeisync.services.sync import ShrinkRefused, SyncService
from imeisync.store.db import Database
from imeisync.store.models import ChangeLog, OutboxChange, Record, SyncState
from imeisync.store.schema import ensure_schema

URL = "http://registry.test"
FEED = f"{URL}/v1/changes"
SNAPSHOT = f"{URL}/v1/snapshot"
REGISTRY_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
OPERATOR_KEY = Ed25519PrivateKey.generate()
KEY_A, KEY_B = "35209900176148", "49015420323751"
AT = "2026-11-21T10:00:00.000000Z"
Answer = tuple[int, list[tuple[str, str]], bytes]


def make_client(**options: Any) -> RegistryClient:
    options.setdefault("retries", 2)
    options.setdefault("backoff", 0)
    return RegistryClient(URL, signing_key=OPERATOR_KEY, kid="op-b",
                          registry_key=REGISTRY_KEY.public_key(), **options)


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    database = Database(sqlite_url)
    ensure_schema(database)
    yield database
    database.dispose()


@pytest.fixture
def service(db: Database) -> SyncService:
    return SyncService(db, make_client, operator_id="op-b", operator_country="SE")


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def signed(status: int, payload: Any = None, *, raw: bytes | None = None,
           key: Ed25519PrivateKey = REGISTRY_KEY, tamper: bool = False,
           unsigned: bool = False, headers: dict[str, str] | None = None,
           ) -> Callable[[requests.PreparedRequest], Answer]:
    def callback(request: requests.PreparedRequest) -> Answer:
        body = raw if raw is not None else json.dumps(payload).encode()
        out = {"content-type": "application/json", **(headers or {})}
        if not unsigned:
            out = sign_response(request.method or "GET", request.url or "",
                                dict(request.headers), status, out, body, key, "registry")
        return status, list(out.items()), body + (b" " if tamper else b"")

    return callback


def entry(seq: int, key: str = KEY_A, action: str = "insert", **fields: Any) -> dict[str, Any]:
    data = {"seq": seq, "type": "change", "change_id": f"op-a:{seq}", "action": action,
            "imei": key, "kind": "block",
            "reason": "stolen" if action == "insert" else "recovered", "at": AT,
            "owner": "op-a", "country": "DK"}
    data.update(fields)
    return data


def page(after: int, entries: list[dict[str, Any]], *, nxt: int | None = None,
         head: int | None = None, more: bool = False) -> dict[str, Any]:
    last = entries[-1]["seq"] if entries else after
    nxt = last if nxt is None else nxt
    return {"after": after, "next": nxt, "head": head if head is not None else nxt,
            "more": more, "entries": entries}


def fingerprint(db: Database) -> tuple[Any, ...]:
    with db.read() as s:
        return (
            s.execute(select(Record.imei_key, Record.owner_id, Record.closed_at)
                      .order_by(Record.id)).all(),
            s.execute(select(func.count()).select_from(ChangeLog)).scalar_one(),
            s.execute(select(SyncState.value).where(SyncState.name == "feed.cursor")).scalar(),
            s.execute(select(OutboxChange.state).order_by(OutboxChange.id)).all(),
        )


@pytest.fixture
def seeded(service: SyncService, mock: responses.RequestsMock, db: Database) -> SyncService:
    """The store holds two foreign records (A's), cursor 2."""
    mock.add_callback(responses.GET, FEED, callback=signed(200, page(0, [entry(1),
                                                                          entry(2, KEY_B)])))
    assert service.pull().opened == 2
    mock.reset()
    return service


# -- transport failures ----------------------------------------------------------------------


@pytest.mark.parametrize(("failure", "code"), [
    (requests.exceptions.ReadTimeout("read timed out"), "registry_timeout"),
    (requests.exceptions.ConnectTimeout("connect timed out"), "registry_timeout"),
    (requests.ConnectionError("[Errno 111] Connection refused"), "registry_unreachable"),
])
def test_timeouts_and_refused_connections_change_nothing(seeded, mock, db, failure, code):
    before = fingerprint(db)
    mock.add(responses.GET, FEED, body=failure)
    with pytest.raises(Unavailable) as caught:
        seeded.pull()
    assert caught.value.code == code
    assert fingerprint(db) == before
    assert seeded.status()["steps"]["pull"]["last_error"]["code"] == code


def test_a_closed_port_is_unavailable_quickly(db):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = RegistryClient(f"http://127.0.0.1:{port}", signing_key=OPERATOR_KEY, kid="op-b",
                            registry_key=REGISTRY_KEY.public_key(), retries=1, backoff=0)
    with pytest.raises(Unavailable, match=r"connection refused|unreachable"):
        client.feed_page(0, 10)


def test_5xx_is_retried_then_reported_and_changes_nothing(seeded, mock, db):
    before = fingerprint(db)
    mock.add(responses.GET, FEED, status=503, json={"title": "down"})
    with pytest.raises(Unavailable, match="HTTP 503"):
        seeded.pull()
    assert len(mock.calls) == 3  # the first try and two retries
    assert fingerprint(db) == before


def test_500_is_not_retried(seeded, mock, db):
    mock.add(responses.GET, FEED, status=500, body="oops")
    with pytest.raises(Unavailable, match="HTTP 500"):
        seeded.pull()
    assert len(mock.calls) == 1


def test_429_with_retry_after_is_retried_and_then_succeeds(seeded, mock, db):
    mock.add(responses.GET, FEED, status=429, headers={"Retry-After": "1"})
    mock.add_callback(responses.GET, FEED, callback=signed(200, page(2, [entry(3, KEY_A,
                                                                             "remove")])))
    result = seeded.pull()
    assert result.closed == 1
    feed_calls = [c for c in mock.calls if c.request.method == "GET"]
    assert len(feed_calls) == 2  # (the pull then acknowledges: POST /v1/acks)


def test_429_that_persists_is_unavailable_with_its_wait(seeded, mock, db):
    before = fingerprint(db)
    mock.add(responses.GET, FEED, status=429, headers={"Retry-After": "120"})
    with pytest.raises(Unavailable, match="wait 120"):
        seeded.pull()
    assert fingerprint(db) == before


def test_refusals_and_bad_requests_map_to_their_exit_codes(service, mock):
    mock.add(responses.GET, FEED, status=401, json={"detail": "keyid 'op-b' is not a member"})
    with pytest.raises(Refused, match="not a member"):
        service.pull()
    mock.reset()
    mock.add(responses.POST, FEED, status=400, json={"detail": "malformed", "code": "0011"})
    with pytest.raises(BadInput, match="0011"):
        make_client().push([{"change_id": "x"}])


# -- answers that cannot be trusted ----------------------------------------------------------


@pytest.mark.parametrize("callback", [
    signed(200, page(2, [entry(3)]), tamper=True),                     # body altered
    signed(200, page(2, [entry(3)]), unsigned=True),                   # no signature
    signed(200, page(2, [entry(3)]), key=OTHER_KEY),                   # another key
    signed(200, raw=b'{"after": 2, "entries": [}'),                     # malformed JSON
    signed(200, page(2, [entry(3, "3520990017614")])),                 # 13-digit IMEI
    signed(200, page(2, [entry(3), entry(4, "35209900176ABC")])),      # one bad among good
    signed(200, page(2, [entry(3, owner="op a")])),                    # malformed owner
    signed(200, page(2, [entry(3, owner=None)])),                      # no owner
    signed(200, page(2, [entry(3, country="Denmark")])),               # bad country
    signed(200, page(2, [entry(3, reason="borrowed")])),               # unknown reason
    signed(200, page(2, [entry(4), entry(3)])),                        # backwards
    signed(200, page(2, [entry(3), entry(3)])),                        # repeated
    signed(200, page(2, [entry(2)])),                                  # not after the cursor
    signed(200, page(0, [entry(1), entry(2, KEY_B)])),                 # the same page again
    signed(200, page(2, [entry(3)], nxt=1)),                           # next goes backwards
    signed(200, page(2, [entry(3)], nxt=9, head=5)),                   # next beyond head
    signed(200, [1, 2, 3]),                                            # not an object
], ids=["tampered", "unsigned", "other-key", "malformed-json", "short-imei", "one-bad",
        "bad-owner", "no-owner", "bad-country", "unknown-reason", "backwards", "repeated",
        "stale", "same-page-twice", "next-backwards", "next-beyond-head", "not-object"])
def test_an_untrustworthy_page_is_refused_whole_and_changes_nothing(seeded, mock, db, callback):
    before = fingerprint(db)
    mock.add_callback(responses.GET, FEED, callback=callback)
    with pytest.raises(RegistryAnswerRejected):
        seeded.pull()
    assert fingerprint(db) == before


def test_an_entry_type_this_version_does_not_know_is_skipped(seeded, mock, db):
    mock.add_callback(responses.GET, FEED, callback=signed(200, page(
        2, [{"seq": 3, "type": "range_insert", "imei": "3520990017"}, entry(4, "11111111111111")]
    )))
    result = seeded.pull()
    assert (result.skipped, result.opened, result.cursor) == (1, 1, 4)


def test_a_push_answer_for_another_batch_leaves_the_changes_to_resend(db, mock):
    service = SyncService(db, make_client, operator_id="op-b", operator_country="SE")
    with db.write() as s:
        s.add(Record(id=1, imei_key=KEY_A, owner_id="op-b", owner_country="SE", kind="block",
                     reason="stolen", source="order", opened_at=_now(), opened_by="o1"))
        s.flush()
        s.add(OutboxChange(change_id="op-b:1", order_id="o1", record_id=1, action="insert",
                           imei_key=KEY_A, kind="block", reason="stolen", at=_now()))
    mock.add_callback(responses.POST, FEED, callback=signed(200, {"results": [
        {"change_id": "op-b:other", "result": "accepted"}]}))
    with pytest.raises(RegistryAnswerRejected, match="do not answer the batch"):
        service.push()
    assert fingerprint(db)[3] == [("sent",)]
    mock.reset()
    mock.add_callback(responses.POST, FEED, callback=signed(200, {"results": [
        {"change_id": "op-b:1", "result": "duplicate"}]}))
    assert service.push().duplicate == 1


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


# -- snapshots ---------------------------------------------------------------------------------


def snapshot_callback(rows: list[str], seq: int, *, cut: int | None = None,
                      tamper: bool = False, key: Ed25519PrivateKey = REGISTRY_KEY,
                      ) -> Callable[[requests.PreparedRequest], Answer]:
    def callback(request: requests.PreparedRequest) -> Answer:
        headers = sign_response(request.method or "GET", request.url or "",
                                dict(request.headers), 200,
                                {"content-type": "text/csv; charset=utf-8",
                                 "snapshot-seq": str(seq)}, None, REGISTRY_KEY, "registry")
        content = SNAPSHOT_HEADER + "".join(f"{r}\n" for r in rows).encode()
        digest = hashlib.sha256(content).hexdigest()
        signature = snapshot_trailer_signature(key, headers["Signature"].encode(), digest,
                                               len(rows), seq)
        body = content + f"#end records={len(rows)} seq={seq} sha256={digest} sig={signature}\n"\
            .encode()
        if tamper:
            body = body.replace(b"stolen", b"lost", 1)
        return 200, list(headers.items()), body[:cut] if cut is not None else body

    return callback


def row(key: str, owner: str = "op-a", seq: int = 1, reason: str = "stolen") -> str:
    return f"{key},{owner},DK,block,{reason},{seq},{AT},"


ROWS = [row(KEY_A, seq=1), row(KEY_B, seq=2)]


def _full_length() -> int:
    content = SNAPSHOT_HEADER + "".join(f"{r}\n" for r in ROWS).encode()
    return len(content)


@pytest.mark.parametrize(("callback", "why"), [
    (snapshot_callback(ROWS, 2, cut=len(SNAPSHOT_HEADER) + 20), "without its closing line"),
    (snapshot_callback(ROWS, 2, cut=_full_length()), "without its closing line"),
    (snapshot_callback(ROWS, 2, cut=_full_length() + 30), "without its closing line"),
    (snapshot_callback(ROWS, 2, tamper=True), "does not match its closing line"),
    (snapshot_callback(ROWS, 2, key=OTHER_KEY), "closing signature does not verify"),
    (snapshot_callback([ROWS[1], ROWS[0]], 2), "out of order"),
    (snapshot_callback([ROWS[0], ROWS[0]], 2), "out of order or repeated"),
    (snapshot_callback([row("3520990017614X")], 2), "not a 14-digit IMEI key"),
    (snapshot_callback([row(KEY_A, owner="op a")], 2), "not an operator id"),
    (snapshot_callback(["too,few,fields"], 2), "does not have 8 fields"),
], ids=["cut-mid-line", "cut-before-end", "cut-in-end", "tampered", "other-key", "unordered",
        "repeated", "bad-imei", "bad-owner", "few-fields"])
def test_a_bad_snapshot_changes_nothing(seeded, mock, db, callback, why):
    mock.add_callback(responses.GET, FEED, callback=signed(200, page(2, [])))
    mock.add_callback(responses.GET, SNAPSHOT, callback=callback)
    before = fingerprint(db)
    with pytest.raises(RegistryAnswerRejected, match=why):
        seeded.reconcile()
    assert fingerprint(db) == before


def test_a_snapshot_of_zero_records_would_close_everything_and_is_refused(seeded, mock, db):
    mock.add_callback(responses.GET, FEED, callback=signed(200, page(2, [])))
    mock.add_callback(responses.GET, SNAPSHOT, callback=snapshot_callback([], 2))
    before = fingerprint(db)
    with pytest.raises(ShrinkRefused):
        seeded.reconcile()
    assert fingerprint(db) == before


def test_a_snapshot_of_zero_records_is_fine_for_an_empty_store(service, mock, db):
    mock.add_callback(responses.GET, SNAPSHOT, callback=snapshot_callback([], 7))
    result = service.reconcile()
    assert (result.records, result.opened, result.mode) == (0, 0, "bootstrap")
    assert service.cursor() == 7


def test_a_snapshot_behind_our_feed_position_is_refused(seeded, mock, db):
    mock.add_callback(responses.GET, FEED, callback=signed(200, page(2, [])))
    mock.add_callback(responses.GET, SNAPSHOT, callback=snapshot_callback(ROWS, 1))
    before = fingerprint(db)
    with pytest.raises(Unavailable, match="moved past the snapshot"):
        seeded.reconcile()
    assert fingerprint(db) == before


def test_a_good_snapshot_repairs_and_keeps_the_spool_out_of_the_way(seeded, mock, db,
                                                                    tmp_path: Path):
    seeded.spool_dir = tmp_path / "spool"
    seeded.spool_dir.mkdir()
    mock.add_callback(responses.GET, FEED, callback=signed(200, page(2, [])))
    mock.add_callback(responses.GET, SNAPSHOT, callback=snapshot_callback(
        [row(KEY_A, seq=1, reason="lost"), row(KEY_B, seq=2)], 2))
    result = seeded.reconcile()
    assert (result.replaced, result.unchanged) == (1, 1)
    assert list(seeded.spool_dir.iterdir()) == []
