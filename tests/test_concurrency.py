"""Two processes writing at once: blocks and lifts of one IMEI, two CSV imports, a fresh database.

Writes are serialised (store/db.py: SQLite ``BEGIN IMMEDIATE``, PostgreSQL advisory lock), so
whatever the interleaving, the store must read as if the orders had come one by one: at most
one open record of ours per device, its history alternating open/close, one outbox change per
accepted order and none for a linked one, one change_log row per open or close, and an audit
chain that verifies with one event per order received.

The workers are real OS processes (``python -c``), started together through a go-line on stdin.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from imeisync.adapters.keys import generate_keypair
from imeisync.adapters.police_jws import sign_order
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.domain.imei import luhn_check_digit
from imeisync.store.models import Record

IMEISYNC = Path(sys.executable).parent / "imeisync"
OPERATOR = "op-a"
KID = "police-dk-1"
ROUNDS = 20
TABLES = ("records", "outbox", "orders", "audit_events", "change_log")

WORKER = textwrap.dedent(
    """
    import json, random, sys, time
    from imeisync.bootstrap import App
    from imeisync.config import load_config
    from imeisync.domain.errors import ImeisyncError
    from imeisync.services.orders import Actor

    config, tokens_file, name = sys.argv[1:4]
    tokens = json.loads(open(tokens_file).read())
    app = App(load_config(config))
    intake = app.intake()
    app.db, app.trusted_keys  # warm up: connect and load keys before the race starts
    actor = Actor(name)
    print("ready", flush=True)
    sys.stdin.readline()  # the go-line: both workers start together
    for order_id, token in tokens:
        try:
            result = intake.submit_signed(token, actor).outcome
        except ImeisyncError as exc:
            result = f"{type(exc).__name__}:{exc.code}:{exc.message}"
        print(json.dumps([order_id, result]), flush=True)
        time.sleep(random.random() * 0.004)
    app.close()
    """
)


# -- helpers ------------------------------------------------------------------------------


def imei(n: int) -> str:
    key = f"{35_000_000_000_000 + n:014d}"
    return key + luhn_check_digit(key)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}


def make_site(tmp_path: Path, database_url: str) -> tuple[Path, Path]:
    """Config file and police private key; the schema is created here, before any race."""
    keys, trusted = tmp_path / "police", tmp_path / "trusted"
    private, public = generate_keypair(KID, keys)
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    config = tmp_path / "imeisync.toml"
    config.write_text(
        f'[operator]\nid = "{OPERATOR}"\ncountry = "DK"\n'
        f'[database]\nurl = "{database_url}"\n'
        f'[police]\ntrusted_keys = "{trusted}"\n'
        f'[security]\ndata_key_file = "{tmp_path / "data.key"}"\n'
    )
    return config, private


def signed(private: Path, order_id: str, kind: str, number: str, reason: str) -> str:
    payload = {
        "order_id": order_id, "kind": kind, "imei": number, "case_ref": f"case-{order_id}",
        "police_unit": "KBH", "reason": reason,
        "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return sign_order(payload, private, KID)


def rows(url: str, sql: str, **params: object) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def counts(url: str) -> dict[str, int]:
    return {t: rows(url, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}


def audit_verify(config: Path) -> dict:
    done = subprocess.run(
        [str(IMEISYNC), "--config", str(config), "--json", "audit", "verify"],
        capture_output=True, text=True, env=clean_env(), timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def run_workers(config: Path, batches: dict[str, list[tuple[str, str]]], tmp_path: Path):
    """Start one process per batch, release them together, return {order_id: result}."""
    procs = {}
    for name, tokens in batches.items():
        tokens_file = tmp_path / f"{name}.json"
        tokens_file.write_text(json.dumps(tokens))
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(config), str(tokens_file), name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=clean_env(),
        )
    try:
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for proc in procs.values():
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"worker {name} failed:\n{err}"
            for line in out.splitlines():
                order_id, result = json.loads(line)
                results[order_id] = result
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- block against lift -------------------------------------------------------------------


def test_concurrent_block_and_lift_of_one_imei_stay_consistent(tmp_path, database_url):
    config, private = make_site(tmp_path, database_url)
    App(load_config(config)).db.dispose()  # create the schema before the race
    number = imei(1)
    key = number[:14]
    blocks = [(f"blk-{i}", signed(private, f"blk-{i}", "block", number, "stolen"))
              for i in range(ROUNDS)]
    lifts = [(f"lft-{i}", signed(private, f"lft-{i}", "lift", number, "recovered"))
             for i in range(ROUNDS)]

    results = run_workers(config, {"blocker": blocks, "lifter": lifts}, tmp_path)

    # Every order got a definite answer; only the outcomes the rules allow.
    assert len(results) == 2 * ROUNDS
    for order_id, result in results.items():
        if order_id.startswith("blk"):
            assert result in ("accepted", "linked"), (order_id, result)
        else:  # a lift finds the record open (accepted) or nothing to lift
            assert result == "accepted" or result.startswith("Refused:no_record:"), result
    accepted = {o for o, r in results.items() if r == "accepted"}
    linked = {o for o, r in results.items() if r == "linked"}
    refused = {o for o, r in results.items() if r.startswith("Refused")}
    assert any(o.startswith("blk") for o in accepted)

    # The orders table says what the workers were told.
    order_rows = dict(rows(database_url, "SELECT order_id, outcome FROM orders"))
    assert len(order_rows) == 2 * ROUNDS
    for order_id, result in results.items():
        expected = result if result in ("accepted", "linked") else "refused"
        assert order_rows[order_id] == expected, order_id

    # At most one open record of ours, and the partial unique index still holds.
    opens = rows(database_url, "SELECT imei_key, owner_id, count(*) FROM records "
                               "WHERE closed_at IS NULL GROUP BY imei_key, owner_id")
    assert all(n == 1 for _, _, n in opens), opens
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            now = datetime.now(UTC)
            row = {"imei_key": key, "owner_id": OPERATOR, "owner_country": "DK",
                   "kind": "block", "reason": "stolen", "source": "order",
                   "opened_at": now, "opened_by": "probe"}
            conn.execute(insert(Record), [row, {**row, "opened_by": "probe-2"}])
    finally:
        engine.dispose()

    # History: records opened by accepted blocks, closed by accepted lifts, one after another.
    records = rows(database_url, "SELECT id, opened_by, closed_by, opened_at, closed_at "
                                 "FROM records WHERE imei_key = :k ORDER BY id", k=key)
    assert {r[1] for r in records} == {o for o in accepted if o.startswith("blk")}
    assert {r[2] for r in records if r[2]} == {o for o in accepted if o.startswith("lft")}
    assert all(r[4] is not None for r in records[:-1]), "only the newest record may be open"
    for opened_by, closed_by, opened_at, closed_at in (r[1:] for r in records):
        assert closed_at is None or _utc(closed_at) >= _utc(opened_at), (opened_by, closed_by)
    for before, after in itertools.pairwise(records):
        assert _utc(after[3]) >= _utc(before[4]), "a record opened before the previous closed"

    # The change sequence alternates open, close, open, … in commit order, times rising.
    log = rows(database_url, "SELECT op, at FROM change_log WHERE imei_key = :k ORDER BY seq",
               k=key)
    assert [op for op, _ in log] == ["open", "close"] * (len(log) // 2) + ["open"] * (
        len(log) % 2)
    assert len(log) == len(accepted)
    times = [_utc(at) for _, at in log]
    assert times == sorted(times), "change_log times do not follow the commit order"

    # One outbox change per accepted order, none for linked or refused ones.
    outbox = rows(database_url, "SELECT order_id, action FROM outbox")
    assert sorted(o for o, _ in outbox) == sorted(accepted)
    assert all((a == "insert") == o.startswith("blk") for o, a in outbox)
    assert not linked & {o for o, _ in outbox}

    # The audit chain verifies and holds one event per order received.
    verified = audit_verify(config)
    assert verified["ok"] is True
    assert verified["events"] == len(accepted) + len(linked) + len(refused) == 2 * ROUNDS
    events = rows(database_url, "SELECT outcome FROM audit_events")
    assert sorted(e[0] for e in events) == sorted(order_rows.values())


def _utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite through plain text() returns strings
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- two CSV imports at once --------------------------------------------------------------


def test_two_concurrent_csv_imports_both_apply_completely(tmp_path, database_url):
    config, _ = make_site(tmp_path, database_url)
    App(load_config(config)).db.dispose()
    n = 300
    shared = imei(999_999)  # on both files: one opens the record, the other links to it
    files = []
    for f in range(2):
        lines = ["imei,case_ref,police_unit,reason,note"]
        lines += [f"{imei(100_000 * (f + 1) + i)},case-{f}-{i},KBH,stolen," for i in range(n)]
        lines.append(f"{shared},case-{f}-shared,KBH,lost,")
        path = tmp_path / f"batch-{f}.csv"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)

    procs = [
        subprocess.Popen([str(IMEISYNC), "--config", str(config), "--json", "order", "import",
                          str(path), "--as", f"importer-{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=clean_env())
        for i, path in enumerate(files)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        reports.append(json.loads(out))

    assert sorted((r["accepted"], r["linked"]) for r in reports) == [(n, 1), (n + 1, 0)]
    total = 2 * (n + 1)
    assert counts(database_url) == {
        "records": total - 1, "outbox": total - 1, "orders": total,
        "audit_events": total, "change_log": total - 1,
    }
    assert rows(database_url, "SELECT count(*) FROM records WHERE closed_at IS NULL "
                              "AND imei_key = :k", k=shared[:14]) == [(1,)]
    assert audit_verify(config)["events"] == total


# -- first contact with an empty database -------------------------------------------------


def test_two_processes_meeting_an_empty_database_both_succeed(tmp_path, database_url, request):
    """The CLI creates the schema of an empty database itself; two at once must not collide.

    A race needs a few tries: each round is a fresh, empty database.
    """
    config, _ = make_site(tmp_path, database_url)
    template = config.read_text()
    for round_ in range(3):
        if database_url.startswith("sqlite"):
            url = f"sqlite:///{tmp_path / f'race-{round_}.db'}"
        else:
            server = request.getfixturevalue("postgres_server")
            name = f"race_{os.getpid()}_{round_}_{os.urandom(3).hex()}"
            url = server.create_database(name)
            request.addfinalizer(lambda server=server, name=name: server.drop_database(name))
        config.write_text(template.replace(database_url, url))
        numbers = [imei(10 * round_), imei(10 * round_ + 1)]
        procs = [
            subprocess.Popen([str(IMEISYNC), "--config", str(config), "order", "block",
                              "--imei", number, "--case", "c-1", "--unit", "KBH"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=clean_env())
            for number in numbers
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"round {round_}: {err}"
        assert counts(url) == {
            "records": 2, "outbox": 2, "orders": 2, "audit_events": 2, "change_log": 2,
        }


# -- times follow the commit order ----------------------------------------------------------


def test_history_times_follow_commit_order_when_writers_wait(tmp_path, sqlite_url):
    """An order that waited for the writer lock is stamped when it gets the lock, not before.

    SQLite-only, because only there can the test choose who wins the lock: a writer that has
    waited long polls in 100 ms steps, one that just arrived polls within milliseconds. So a
    block that asked first (A) loses to a lift that asked later (B); were times read before the
    lock, B would close the record at a time *after* A opens the next one — a history that runs
    backwards, and registry changes whose ``at`` contradicts their order.
    """
    import sqlite3

    config, private = make_site(tmp_path, sqlite_url)
    number = imei(7)
    app = App(load_config(config))
    from imeisync.services.orders import Actor

    app.intake().submit_signed(signed(private, "blk-0", "block", number, "stolen"), Actor("t"))
    app.close()
    batches = {"A": [("blk-1", signed(private, "blk-1", "block", number, "stolen"))],
               "B": [("lft-1", signed(private, "lft-1", "lift", number, "recovered"))]}
    procs = {}
    for name, tokens in batches.items():
        tokens_file = tmp_path / f"{name}.json"
        tokens_file.write_text(json.dumps(tokens))
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(config), str(tokens_file), name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=clean_env(),
        )
    results = {}
    try:
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        for name, pause in (("A", 0.8), ("B", 0.05)):
            procs[name].stdin.write("go\n")
            procs[name].stdin.flush()
            time.sleep(pause)
        holder.execute("ROLLBACK")
        holder.close()
        for proc in procs.values():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            results.update(json.loads(line) for line in out.splitlines())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert results["lft-1"] == "accepted", results
    log = rows(sqlite_url, "SELECT op, at FROM change_log ORDER BY seq")
    times = [_utc(at) for _, at in log]
    assert times == sorted(times), f"change_log runs backwards: {log} ({results})"
    outbox = [_utc(at) for (at,) in rows(sqlite_url, "SELECT at FROM outbox ORDER BY id")]
    assert outbox == sorted(outbox), "registry changes would carry times out of order"
    records = rows(sqlite_url, "SELECT opened_at, closed_at FROM records ORDER BY id")
    for (_, closed), (opened, _) in itertools.pairwise(records):
        assert _utc(opened) >= _utc(closed), f"opened before the previous closed: {records}"
