"""A crash (SIGKILL) while an order is being accepted leaves the whole order or nothing.

"The whole order" is: its order row, its record opened (block) or closed (lift), one outbox
change, one change_log row and one audit event. Three ways of killing:

* deterministically, inside the write transaction (the audit append, the last write before the
  commit) and just after the commit, in a child process that SIGKILLs itself there;
* at random moments, a warm child looping over blocks and lifts, killed 0-150 ms after it starts;
* at random moments, the ``imeisync order block`` command itself.

Afterwards every order is checked for all-or-nothing, the audit chain must verify, and the
database must take new orders (no lock left behind).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from imeisync.adapters.keys import generate_keypair
from imeisync.adapters.police_jws import sign_order
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.domain.imei import luhn_check_digit
from imeisync.services.orders import Actor

IMEISYNC = Path(sys.executable).parent / "imeisync"
KID = "police-dk-1"

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import UTC, datetime
    from imeisync.adapters.police_jws import sign_order
    from imeisync.bootstrap import App
    from imeisync.config import load_config
    from imeisync.domain.errors import ImeisyncError
    from imeisync.domain.imei import luhn_check_digit
    from imeisync.services import audit, orders
    from imeisync.services.orders import Actor

    config, key, mode = sys.argv[1:4]
    app = App(load_config(config))
    intake = app.intake()
    app.db, app.trusted_keys, app.cipher  # warm up before the dangerous part
    actor = Actor("crash-child")

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def sign(order_id, kind, number, reason):
        payload = {"order_id": order_id, "kind": kind, "imei": number, "case_ref": "c-" + order_id,
                   "police_unit": "KBH", "reason": reason,
                   "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        return sign_order(payload, key, "police-dk-1")

    if mode == "loop":  # blocks and lifts, one new IMEI each, until killed
        start = int(sys.argv[4])
        print("ready", flush=True)
        for i in range(start, start + 100000):
            k = f"{35_100_000_000_000 + i:014d}"
            number = k + luhn_check_digit(k)
            intake.submit_unsigned({"order_id": f"loop-b-{i}", "imei": number, "case_ref": "c",
                                    "police_unit": "KBH", "reason": "stolen",
                                    "note": "owner: J. Jensen"}, actor)
            if i % 2:
                intake.submit_signed(sign(f"loop-l-{i}", "lift", number, "recovered"), actor)
    else:  # hook: die at a given point while submitting one signed order
        point, order_id, kind, number = sys.argv[4:8]
        if point == "before_commit":
            audit.append = die  # inside the write transaction, after every other write
        elif point == "after_commit":
            apply = orders.OrderIntake.apply
            def apply_then_die(self, *args, **kwargs):
                apply(self, *args, **kwargs)
                die()
            orders.OrderIntake.apply = apply_then_die
        reason = "recovered" if kind == "lift" else "stolen"
        try:
            intake.submit_signed(sign(order_id, kind, number, reason), actor)
        except ImeisyncError as exc:
            print(exc, flush=True)
    """
)


# -- helpers ------------------------------------------------------------------------------


def imei(n: int) -> str:
    key = f"{35_200_000_000_000 + n:014d}"
    return key + luhn_check_digit(key)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}


@pytest.fixture
def site(tmp_path, database_url):
    keys, trusted = tmp_path / "police", tmp_path / "trusted"
    private, public = generate_keypair(KID, keys)
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    config = tmp_path / "imeisync.toml"
    config.write_text(
        f'[operator]\nid = "op-a"\ncountry = "DK"\n'
        f'[database]\nurl = "{database_url}"\n'
        f'[police]\ntrusted_keys = "{trusted}"\n'
        f'[security]\ndata_key_file = "{tmp_path / "data.key"}"\n'
    )
    app = App(load_config(config))
    assert app.db is not None  # the schema exists before any child is killed
    yield config, private, app
    app.close()


def signed(private: Path, order_id: str, kind: str, number: str) -> str:
    payload = {
        "order_id": order_id, "kind": kind, "imei": number, "case_ref": f"c-{order_id}",
        "police_unit": "KBH", "reason": "recovered" if kind == "lift" else "stolen",
        "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return sign_order(payload, private, KID)


def child(config: Path, private: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(config), str(private), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env(),
    )


def query(url: str, sql: str, **params: object) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def audit_ok(config: Path) -> int:
    done = subprocess.run([str(IMEISYNC), "--config", str(config), "--json", "audit", "verify"],
                          capture_output=True, text=True, env=clean_env(), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["events"]


def check_all_or_nothing(url: str) -> dict[str, str]:
    """Every order's traces are complete, and nothing exists without its order."""
    orders = {o: (kind, key, outcome) for o, kind, key, outcome in query(
        url, "SELECT order_id, kind, imei_key, outcome FROM orders")}
    assert len(orders) == query(url, "SELECT count(*) FROM orders")[0][0], "duplicate order ids"
    outcomes = {o: v[2] for o, v in orders.items()}
    accepted = {o for o, v in orders.items() if v[2] == "accepted"}

    opened = Counter(o for (o,) in query(url, "SELECT opened_by FROM records"))
    closed = Counter(o for (o,) in query(url, "SELECT closed_by FROM records") if o)
    outbox = Counter(o for (o,) in query(url, "SELECT order_id FROM outbox"))
    events = Counter()
    for action, detail in query(url, "SELECT action, detail FROM audit_events"):
        events[json.loads(detail).get("order_id")] += 1
        assert action.startswith("order."), action
    changes = Counter(k for (k,) in query(url, "SELECT imei_key FROM change_log"))

    for order_id, (kind, _, outcome) in orders.items():
        where = f"order {order_id} ({kind}, {outcome})"
        assert events[order_id] == 1, f"{where}: {events[order_id]} audit events"
        if outcome == "accepted":
            assert outbox[order_id] == 1, f"{where}: {outbox[order_id]} outbox changes"
            traces = opened if kind != "lift" else closed
            assert traces[order_id] == 1, f"{where}: its record is not there"
        else:
            assert outbox[order_id] == 0, f"{where}: has an outbox change"
    for what, found in (("record", opened), ("close", closed), ("outbox change", outbox)):
        orphans = set(found) - accepted
        assert not orphans, f"{what} without an accepted order: {sorted(orphans)[:5]}"
    assert not set(events) - set(orders), "audit events without an order row"
    per_key = Counter(key for o, (_, key, _) in orders.items() if o in accepted)
    assert changes == per_key, "change_log rows do not match accepted opens and closes"
    open_twice = query(url, "SELECT imei_key FROM records WHERE closed_at IS NULL "
                            "GROUP BY imei_key, owner_id HAVING count(*) > 1")
    assert not open_twice
    return outcomes


def still_takes_orders(app: App, private: Path, n: int) -> None:
    """No lock or half transaction left behind: a new order goes through at once."""
    started = time.monotonic()
    outcome = app.intake().submit_signed(signed(private, f"after-{n}", "block", imei(n)),
                                         Actor("after"))
    assert outcome.outcome == "accepted"
    assert time.monotonic() - started < 5


# -- deterministic: killed at a chosen point -----------------------------------------------


def test_killed_before_commit_leaves_nothing(site, database_url):
    config, private, app = site
    number = imei(1)
    proc = child(config, private, "hook", "before_commit", "ord-1", "block", number)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed at the hook: {err}"

    assert check_all_or_nothing(database_url) == {}
    assert query(database_url, "SELECT count(*) FROM records")[0][0] == 0
    assert audit_ok(config) == 0
    # The order was never accepted, so the police's order can simply be submitted again.
    again = app.intake().submit_signed(signed(private, "ord-1", "block", number), Actor("t"))
    assert again.outcome == "accepted"
    assert check_all_or_nothing(database_url) == {"ord-1": "accepted"}


def test_killed_after_commit_keeps_the_whole_order(site, database_url):
    config, private, _ = site
    proc = child(config, private, "hook", "after_commit", "ord-2", "block", imei(2))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    assert check_all_or_nothing(database_url) == {"ord-2": "accepted"}
    assert audit_ok(config) == 1


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_killed_lift_closes_completely_or_not_at_all(site, database_url, point):
    config, private, app = site
    number = imei(3)
    app.intake().submit_signed(signed(private, "blk-3", "block", number), Actor("t"))
    proc = child(config, private, "hook", point, "lft-3", "lift", number)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err

    outcomes = check_all_or_nothing(database_url)
    open_records = query(database_url, "SELECT count(*) FROM records WHERE closed_at IS NULL")
    if point == "before_commit":
        assert outcomes == {"blk-3": "accepted"}
        assert open_records == [(1,)], "the record must still be open"
    else:
        assert outcomes == {"blk-3": "accepted", "lft-3": "accepted"}
        assert open_records == [(0,)]
    assert audit_ok(config) == len(outcomes)
    still_takes_orders(app, private, 4)


def test_killed_while_recording_a_refusal_leaves_no_half_refusal(site, database_url):
    """A refused order writes an order row and an audit event: both or neither."""
    config, private, app = site
    proc = child(config, private, "hook", "before_commit", "lft-5", "lift", imei(5))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    assert check_all_or_nothing(database_url) == {}
    assert audit_ok(config) == 0
    still_takes_orders(app, private, 6)


# -- random moments ------------------------------------------------------------------------


def test_killed_at_random_moments_leaves_whole_orders_only(site, database_url):
    config, private, app = site
    rng = random.Random()
    rounds, killed_while_running = 5, 0
    for round_ in range(rounds):
        proc = child(config, private, "loop", str(round_ * 10_000))
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0, 0.15))
            killed_while_running += proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
    assert killed_while_running == rounds

    outcomes = check_all_or_nothing(database_url)
    assert any(o == "accepted" for o in outcomes.values()), "the child never got an order in"
    assert audit_ok(config) == len(outcomes)
    still_takes_orders(app, private, 7)


def test_cli_killed_at_random_moments_leaves_whole_orders_only(site, database_url):
    """The real command, killed anywhere from start-up to the reply (~0.5 s)."""
    config, private, app = site
    rng = random.Random()
    for n in range(5):
        proc = subprocess.Popen(
            [str(IMEISYNC), "--config", str(config), "order", "block", "--imei", imei(100 + n),
             "--case", f"c-{n}", "--unit", "KBH", "--note", "owner: J. Jensen"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
        )
        time.sleep(rng.uniform(0.2, 0.9))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    outcomes = check_all_or_nothing(database_url)
    assert audit_ok(config) == len(outcomes)
    still_takes_orders(app, private, 8)
