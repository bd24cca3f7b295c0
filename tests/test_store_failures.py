"""The database missing, locked, read-only or unreachable: exit 3, one line, nothing half-written.

CONTRACT.md: exit 3 is "unavailable (database or registry down)", and every refusal prints one
line saying what was wrong and what to do. Each case counts the rows of every table the order
path writes before and after, so a partly applied order would show.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import imeisync.store.db
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.entrypoints.cli import cli
from imeisync.services.orders import Actor

IMEISYNC = Path(sys.executable).parent / "imeisync"
TABLES = ("records", "outbox", "orders", "audit_events", "change_log")
BLOCK = ["order", "block", "--imei", "35-209900-176148-1", "--case", "CPH-7", "--unit", "KBH"]
EXISTING = "490154203237518"


# -- helpers ------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}


def write_config(folder: Path, url: str) -> Path:
    trusted = folder / "trusted"
    trusted.mkdir(exist_ok=True)
    config = folder / "imeisync.toml"
    config.write_text(
        f'[operator]\nid = "op-a"\ncountry = "DK"\n[database]\nurl = "{url}"\n'
        f'[police]\ntrusted_keys = "{trusted}"\n'
        f'[security]\ndata_key_file = "{folder / "data.key"}"\n'
    )
    return config


def seed(config: Path) -> None:
    """A working database with one accepted block, so that 'unchanged' means something."""
    app = App(load_config(config))
    try:
        app.intake().submit_unsigned(
            {"imei": EXISTING, "case_ref": "CPH-1", "police_unit": "KBH", "reason": "stolen"},
            Actor("seed"),
        )
    finally:
        app.close()


def counts(url: str) -> dict[str, int]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in TABLES}
    finally:
        engine.dispose()


def assert_one_line_unavailable(code: int, stderr: str, *words: str) -> str:
    assert code == 3, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("imeisync: ") and "database" in line, line
    assert " — " in line, f"no hint on what to do: {line}"
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


def run_cli(config: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [str(IMEISYNC), "--config", str(config), *args]
    if user:
        entry = pwd.getpwnam(user)
        cmd = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
               "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)


def invoke(config: Path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(config), *args], env={"IMEISYNC_DEBUG": None})


# -- missing ------------------------------------------------------------------------------


def test_missing_database_exit_3_and_nothing_created(tmp_path, database_url):
    if database_url.startswith("sqlite"):
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the database folder should be\n")
        url = f"sqlite:///{blocker / 'sub' / 'imeisync.db'}"
        words = (str(blocker / "sub"), "cannot be created")
    else:  # a server that is up, a database that is not there
        url = make_url(database_url).set(database="no_such_imeisync_db").render_as_string(False)
        words = ("no_such_imeisync_db", "does not exist")
    config = write_config(tmp_path, url)
    done = run_cli(config, *BLOCK)  # the real command: no traceback, one line
    assert_one_line_unavailable(done.returncode, done.stderr, *words)
    for args in (["check", EXISTING], ["audit", "verify"], ["db", "upgrade"]):
        result = invoke(config, *args)
        assert_one_line_unavailable(result.exit_code, result.stderr, *words)
    if database_url.startswith("sqlite"):
        assert blocker.read_text().startswith("a file where"), "the file was touched"


# -- unreachable --------------------------------------------------------------------------


def test_postgresql_unreachable_exit_3_quickly(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, f"postgresql+psycopg://imeisync@127.0.0.1:{port}/imeisync")
    for args in (BLOCK, ["check", EXISTING]):
        started = time.monotonic()
        done = run_cli(config, *args)
        line = assert_one_line_unavailable(done.returncode, done.stderr, f"127.0.0.1:{port}",
                                           "running and reachable")
        assert "password" not in line.lower()
        assert time.monotonic() - started < 20


# -- locked -------------------------------------------------------------------------------


@pytest.fixture
def short_lock_timeout(monkeypatch):
    """store/db.py waits 10 s for the writer lock; the test does not need to."""
    monkeypatch.setattr(imeisync.store.db, "LOCK_TIMEOUT_MS", 300)


@pytest.fixture
def lock_holder(database_url) -> Iterator[object]:
    """Another process's writer holding the lock: BEGIN IMMEDIATE, or the advisory lock."""
    lock = threading.Lock()  # release once, from the test or from the safety timer
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(make_url(database_url).database, isolation_level=None,
                               check_same_thread=False)

        def hold():
            conn.execute("BEGIN IMMEDIATE")

        def unlock():
            conn.execute("ROLLBACK")
    else:
        engine = create_engine(database_url, poolclass=NullPool)
        conn = engine.connect()

        def hold():
            conn.begin()
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                         {"k": imeisync.store.db.WRITE_LOCK_KEY})

        def unlock():
            conn.rollback()

    held = False

    def release():
        nonlocal held
        with lock:
            if held:
                held = False
                unlock()

    def holder():
        nonlocal held
        with lock:
            hold()
            held = True
        # Should the command wait for ever (no lock timeout), the lock goes after 8 s and the
        # test fails on the exit code instead of hanging.
        safety = threading.Timer(8, release)
        safety.daemon = True
        safety.start()

    yield holder, release
    release()
    conn.close()


def test_locked_database_exit_3_and_nothing_written(
    tmp_path, database_url, short_lock_timeout, lock_holder
):
    config = write_config(tmp_path, database_url)
    seed(config)
    before = counts(database_url)
    csv = tmp_path / "batch.csv"
    csv.write_text("imei,case_ref,police_unit,reason,note\n354178036859789,CPH-9,KBH,lost,\n")
    hold, release = lock_holder
    hold()
    try:
        for args in (BLOCK, ["order", "import", str(csv)]):
            started = time.monotonic()
            result = invoke(config, *args)
            assert_one_line_unavailable(result.exit_code, result.stderr, "lock")
            assert time.monotonic() - started < 8, "it waited far longer than the lock timeout"
        # Reading still works while a writer holds the lock.
        result = invoke(config, "check", EXISTING)
        assert (result.exit_code, result.stdout.strip()) == (0, "BLACKLISTED")
    finally:
        release()
    assert counts(database_url) == before
    # Released: the same order goes through.
    assert invoke(config, *BLOCK).exit_code == 0
    assert counts(database_url)["records"] == before["records"] + 1


# -- read-only ----------------------------------------------------------------------------


def test_read_only_database_exit_3_and_nothing_written(tmp_path, database_url):
    """SQLite opened read-only (URI mode=ro); PostgreSQL refusing writes like a standby."""
    config = write_config(tmp_path, database_url)
    seed(config)
    before = counts(database_url)
    if database_url.startswith("sqlite"):
        path = make_url(database_url).database
        read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    else:
        read_only = database_url + "?options=-c%20default_transaction_read_only%3Don"
    config = write_config(tmp_path, read_only)
    result = invoke(config, *BLOCK)
    assert_one_line_unavailable(result.exit_code, result.stderr, "read-only")
    result = invoke(config, "order", "block", "--imei", EXISTING, "--case", "CPH-2",
                    "--unit", "KBH")  # would be a link: still a write (order row, audit)
    assert_one_line_unavailable(result.exit_code, result.stderr, "read-only")
    assert counts(database_url) == before
    # A read-only database still answers reads.
    result = invoke(config, "check", EXISTING)
    assert (result.exit_code, result.stdout.strip()) == (0, "BLACKLISTED")
    assert not list(tmp_path.glob("file:*")), "the URI was taken for a folder path"


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """pytest's tmp_path is private to root; an unprivileged user must reach this one."""
    folder = Path(tempfile.mkdtemp(prefix="imeisync-ro-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not _has_user("nobody"),
                    reason="needs root, setpriv and a 'nobody' user to run as another user")
def test_read_only_sqlite_file_for_an_unprivileged_user_exit_3(world_readable_dir):
    """File 0444 in a folder 0555, used by a user who may not write it (root always may)."""
    folder = world_readable_dir
    (folder / "db").mkdir()
    url = f"sqlite:///{folder / 'db' / 'imeisync.db'}"
    config = write_config(folder, url)
    seed(config)
    before = counts(url)
    for path in (folder / "db").iterdir():
        path.chmod(0o444)
    (folder / "db").chmod(0o555)
    for path in (config, folder / "trusted"):
        path.chmod(0o755 if path.is_dir() else 0o644)

    done = run_cli(config, *BLOCK, user="nobody")
    assert_one_line_unavailable(done.returncode, done.stderr, "read", "permissions")
    assert counts(url) == before
