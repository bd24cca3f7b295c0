"""The reference registry under load (signatures checked before any database work, a rate per
member, a cap on concurrent snapshots, Retry-After on every refusal) and the daemon's client
honouring it (Retry-After respected, jittered back-off, a cap per request and per run)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event

from imeisync.adapters.http_signatures import OperatorAuth, verify_response
from imeisync.adapters.registry_retry import RetryPolicy, parse_retry_after
from imeisync.domain.errors import BadInput, Unavailable
from imeisync.registry.config import load_registry_config
from support.registry_lab import InProcessRegistry, Lab

MEMBERS = [("op-a", "DK"), ("op-b", "SE")]


@contextlib.contextmanager
def checkouts(engine: Any) -> Iterator[list[int]]:
    taken = [0]

    def checkout(*_args: Any) -> None:
        taken[0] += 1

    event.listen(engine, "checkout", checkout)
    try:
        yield taken
    finally:
        event.remove(engine, "checkout", checkout)


def _session(reg: InProcessRegistry, key: Ed25519PrivateKey | None, kid: str
             ) -> requests.Session:
    session = requests.Session()
    session.mount("http://", reg.adapter)
    if key is not None:
        session.auth = OperatorAuth(key, kid)
    return session


@pytest.fixture
def reg(tmp_path: Path, sqlite_url: str) -> Iterator[InProcessRegistry]:
    registry = InProcessRegistry(tmp_path / "lab", MEMBERS, sqlite_url,
                                 server_extra='member_rate = "3/m"\nmax_snapshots = 1')
    yield registry
    registry.close()


# -- the registry -------------------------------------------------------------------------------


def test_the_limits_are_read_from_the_server_section(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab", MEMBERS, port=1, server_extra='member_rate = "5/m"')
    config = load_registry_config(lab.registry_config)
    assert (config.member_rate, config.max_snapshots) == ("5/m", 2)
    for line, words in (('member_rate = "lots"', "member_rate"),
                        ("max_snapshots = 0", "max_snapshots"),
                        ('max_snapshots = "2"', "max_snapshots")):
        bad = Lab(tmp_path / f"bad{len(line)}", MEMBERS, port=1, server_extra=line)
        with pytest.raises(BadInput, match=words):
            load_registry_config(bad.registry_config)


def test_an_unsigned_or_forged_flood_never_opens_a_database_session(
        reg: InProcessRegistry) -> None:
    url = reg.url + "/v1/changes"
    forger = _session(reg, Ed25519PrivateKey.generate(), "op-a")  # op-a's keyid, not its key
    unsigned = _session(reg, None, "")
    with checkouts(reg.app.db.engine) as taken:
        for session in (forger, unsigned):
            statuses = [(session.post(url, json={"changes": []}) if n % 2 else
                         session.get(url, params={"after": 0})).status_code for n in range(25)]
            assert statuses == [401] * 20 + [429] * 5
        big = forger.post(url, data=b" " * (5 << 20))
    assert big.status_code == 429
    assert taken[0] == 0
    refused = forger.get(url, params={"after": 0})
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["code"] == "too_many_failures"
    verify_response(refused, reg.registry_public)  # refusals are signed too
    # The brake is per address and claimed member: op-b, at the same address, is served; the
    # member the forger claims to be is refused at this address until the brake eases.
    member_b = _session(reg, reg.keys["op-b"], "op-b")
    assert member_b.get(url, params={"after": 0}).status_code == 200
    member_a = _session(reg, reg.keys["op-a"], "op-a")
    assert member_a.get(url, params={"after": 0}).status_code == 429


def test_an_oversized_body_is_refused_before_its_signature_or_the_database(
        reg: InProcessRegistry) -> None:
    session = _session(reg, reg.keys["op-a"], "op-a")
    with checkouts(reg.app.db.engine) as taken:
        answer = session.post(reg.url + "/v1/changes", data=b" " * ((4 << 20) + 1))
    assert answer.status_code == 413 and taken[0] == 0
    assert answer.json()["code"] == "too_large"


def test_each_member_has_its_own_rate_spent_only_by_its_verified_requests(
        reg: InProcessRegistry) -> None:
    url = reg.url + "/v1/changes"
    a, b = _session(reg, reg.keys["op-a"], "op-a"), _session(reg, reg.keys["op-b"], "op-b")
    forger = _session(reg, Ed25519PrivateKey.generate(), "op-b")
    assert [forger.get(url, params={"after": 0}).status_code for _ in range(5)] == [401] * 5
    assert [a.get(url, params={"after": 0}).status_code for _ in range(3)] == [200] * 3
    refused = a.get(url, params={"after": 0})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "20"
    body = verify_response(refused, reg.registry_public)
    assert b"op-a" in body and b"Retry-After" in body
    # op-b's allowance is whole: the forged requests in its name did not spend it
    assert [b.get(url, params={"after": 0}).status_code for _ in range(3)] == [200] * 3


def _asgi_get(reg: InProcessRegistry, op: str, path: str) -> tuple[dict[str, Any], bytes]:
    """A signed GET as an ASGI scope (headers as the client would send them)."""
    prepared = requests.Request("GET", reg.url + path).prepare()
    OperatorAuth(reg.keys[op], op)(prepared)
    headers = [(k.lower().encode(), v.encode()) for k, v in prepared.headers.items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"host", b"registry.test"),
                                                                *headers],
             "client": ("127.0.0.1", 40000), "server": ("registry.test", 80)}
    return scope, b""


def test_at_most_max_snapshots_stream_at_once_then_the_slot_is_free_again(
        reg: InProcessRegistry) -> None:
    app = reg.app.app

    async def scenario() -> list[int]:
        statuses: list[int] = []
        hold, held = asyncio.Event(), asyncio.Event()
        forever = asyncio.Event()

        async def run(op: str, block: bool) -> None:
            scope, _ = _asgi_get(reg, op, "/v1/snapshot")
            sent = [False]

            async def receive() -> dict[str, Any]:
                if not sent[0]:
                    sent[0] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await forever.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])
                elif block and message.get("more_body"):  # a slow reader mid-snapshot
                    held.set()
                    await hold.wait()

            await app(scope, receive, send)

        slow = asyncio.create_task(run("op-a", True))
        await asyncio.wait_for(held.wait(), 10)
        await run("op-b", False)  # refused: the one slot is taken
        hold.set()
        await asyncio.wait_for(slow, 10)
        await run("op-b", False)  # served: the slot was freed
        return statuses

    assert asyncio.run(scenario()) == [200, 503, 200]
    assert reg.app.limits.snapshots == 0


# -- the client's policy --------------------------------------------------------------------


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later, now=lambda: now) == 90.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_the_wait_is_never_shorter_than_asked_jittered_and_capped() -> None:
    low = RetryPolicy(rng=lambda: 0.0, retries=5)
    high = RetryPolicy(rng=lambda: 1.0, retries=5)
    assert low.wait_for(429, "4", 0) == 4.0 and high.wait_for(429, "4", 0) == 5.0
    assert low.wait_for(503, None, 0) == 0.5 and high.wait_for(503, None, 3) == 5.0
    assert high.wait_for(503, None, 4) == 10.0  # backoff_max 10 s, then +25 % jitter
    assert high.wait_for(429, "29", 0) == 30.0  # capped at retry_after_max, never below asked
    assert high.wait_for(429, "31", 0) is None  # longer than we wait: give up now
    assert high.wait_for(500, None, 0) is None  # not a "not now"
    assert high.wait_for(429, "1", 5) is None  # retries per request


def test_the_retry_budget_is_per_run() -> None:
    slept: list[float] = []
    policy = RetryPolicy(budget=2, rng=lambda: 0.5, sleep=slept.append)
    for _ in range(2):
        wait = policy.wait_for(429, "1", 0)
        assert wait is not None
        policy.pause(429, "1", wait)
    assert policy.wait_for(429, "1", 0) is None
    assert [r.asked for r in policy.history] == [1.0, 1.0] and slept == [1.125, 1.125]
    policy.new_run()
    assert policy.wait_for(429, "1", 0) is not None and policy.history == []


# -- the client against a real registry with a tiny limit ---------------------------------------


@pytest.fixture(scope="module")
def tight_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("tight"), MEMBERS, server_extra='member_rate = "2/s"')
    lab.start()
    yield lab
    lab.close()


def _counted_client(lab: Lab, op: str, policy: RetryPolicy) -> tuple[Any, list[float]]:
    import time

    from imeisync.adapters.keys import load_private_key, load_public_key
    from imeisync.adapters.registry_client import RegistryClient

    keys = lab.root / "keys"
    client = RegistryClient(lab.url, signing_key=load_private_key(keys / f"{op}.key"), kid=op,
                            registry_key=load_public_key(keys / "registry.pub"), policy=policy)
    sent: list[float] = []
    client.session.hooks["response"].append(lambda r, *a, **k: sent.append(time.monotonic()))
    return client, sent


def test_the_client_waits_as_long_as_the_registry_asks_and_then_is_served(
        tight_registry: Lab) -> None:
    policy = RetryPolicy(retries=3, budget=8)
    client, sent = _counted_client(tight_registry, "op-a", policy)
    for _ in range(6):
        assert client.feed_page(0, 10).entries == []
    assert len(policy.history) >= 2  # 2/s: the burst of two, then the registry says wait
    assert all(r.status == 429 and r.asked == 1.0 for r in policy.history)
    assert all(1.0 <= r.waited <= 1.25 for r in policy.history)
    assert len(sent) == 6 + len(policy.history)  # each wait is one more request, no more
    # after each wait the next request came at least the asked second later
    gaps = sorted(b - a for a, b in itertools.pairwise(sent))
    assert sum(gap >= 0.99 for gap in gaps) >= len(policy.history)


def test_a_run_that_meets_a_refusal_each_time_stops_at_its_budget(tight_registry: Lab) -> None:
    slept: list[float] = []
    policy = RetryPolicy(retries=10, budget=3, sleep=slept.append)  # never actually waits
    client, sent = _counted_client(tight_registry, "op-b", policy)
    with pytest.raises(Unavailable, match="wait 1 s"):
        for _ in range(10):
            client.feed_page(0, 10)
    assert len(slept) == 3 and all(w >= 1.0 for w in slept)  # each wait honoured Retry-After
    assert len(sent) <= 2 + 1 + 3  # the burst, the refusal, three retries: no storm


def test_each_sync_step_is_a_run_with_its_own_retry_budget(tmp_path: Path,
                                                           sqlite_url: str) -> None:
    reg = InProcessRegistry(tmp_path / "lab", MEMBERS, sqlite_url)
    try:
        operator = reg.operator("op-b", f"sqlite:///{tmp_path / 'op-b.db'}")
        sync = operator.app.sync()
        sync.pull()
        policy = sync.client.policy
        policy._spent = policy.budget  # the last step used up its retries
        assert policy.wait_for(429, "1", 0) is None
        sync.pull()
        assert policy.wait_for(429, "1", 0) is not None  # the next step starts afresh
        sync.close()
    finally:
        reg.close()
