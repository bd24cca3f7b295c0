"""Database fixtures shared by the whole test suite (SQLite and a real PostgreSQL).

Fixtures:

``database_url``
    Parametrized ``sqlite`` / ``postgresql``: every test using it runs twice. Yields a
    SQLAlchemy URL of a fresh, empty database (``sqlite:///<tmp_path>/imeisync.db`` or a
    new database on the throwaway PostgreSQL server). The postgresql variant carries the
    ``postgres`` marker, so ``-m "not postgres"`` runs SQLite only.
``sqlite_url``
    SQLite only: ``sqlite:///<tmp_path>/imeisync.db`` (the file does not exist yet).
``postgres_url``
    PostgreSQL only: ``postgresql+psycopg://imeisync@127.0.0.1:PORT/<unique>``, a fresh
    empty database, dropped after the test. Tests using it get the ``postgres`` marker.
``postgres_server``
    Session-scoped ``support.pg_server.ThrowawayPostgres`` (``.create_database()``, ``.url()``).

One PostgreSQL server serves the whole run, including all pytest-xdist workers: the
first worker that needs it starts it (under a file lock), and the controller process
stops it (``pg_ctl stop -m immediate``) when the session ends, pass or fail. Runs that
select no PostgreSQL test never start it. If the PostgreSQL binaries are missing the
PostgreSQL tests are skipped locally but FAIL when ``CI`` or ``IMEISYNC_REQUIRE_PG=1``
is set.

Application fixtures do NOT belong here: put them in ``tests/support/fixtures_app.py`` (or other
``tests/support/fixtures_*.py`` modules). Every ``tests/support/fixtures_*.py`` is loaded as a
plugin via ``pytest_plugins`` below, so its fixtures are visible to all tests without editing this
file (and its helpers can be imported with ``from support.fixtures_app import ...``). Labs,
harnesses and the PostgreSQL server live in ``tests/support/`` too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from support.pg_server import PostgresError, PostgresUnavailable, SharedPostgres, pg_required
except ModuleNotFoundError:  # tests/ became a package
    from tests.support.pg_server import (
        PostgresError,
        PostgresUnavailable,
        SharedPostgres,
        pg_required,
    )

# Application fixtures live in their own modules: tests/support/fixtures_app.py,
# tests/support/fixtures_*.py. All of them are registered here automatically (module names
# relative to tests/: support.fixtures_app).
pytest_plugins = [
    f"{__package__}.support.{p.stem}" if __package__ else f"support.{p.stem}"
    for p in sorted((Path(__file__).parent / "support").glob("fixtures_*.py"))
]

_SHARED = pytest.StashKey[SharedPostgres]()
_OWNER = pytest.StashKey[bool]()
_WORKERINPUT_DIR = "imeisync_pg_state_dir"
_WORKERINPUT_PID = "imeisync_pg_owner_pid"


# -- one PostgreSQL server per test run ---------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput and _WORKERINPUT_DIR in workerinput:  # pytest-xdist worker
        config.stash[_SHARED] = SharedPostgres(
            workerinput[_WORKERINPUT_DIR], workerinput[_WORKERINPUT_PID]
        )
        config.stash[_OWNER] = False
        return
    # Controller (or plain non-xdist run). /tmp, mode 0755: when we are root the server
    # runs as an unprivileged user who must be able to traverse this directory.
    state_dir = tempfile.mkdtemp(prefix="imeisync-pgrun-", dir="/tmp")
    os.chmod(state_dir, 0o755)
    config.stash[_SHARED] = SharedPostgres(state_dir, os.getpid())
    config.stash[_OWNER] = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist hook: pass the shared state to workers
    shared = node.config.stash[_SHARED]
    node.workerinput[_WORKERINPUT_DIR] = str(shared.state_dir)
    node.workerinput[_WORKERINPUT_PID] = shared.owner_pid


def pytest_unconfigure(config: pytest.Config) -> None:
    if not config.stash.get(_OWNER, False):
        return
    shared = config.stash[_SHARED]
    try:
        shared.shutdown()
    finally:
        shutil.rmtree(shared.state_dir, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"postgres_url", "postgres_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(pytestconfig: pytest.Config):
    """The run's throwaway PostgreSQL server (``support.pg_server.ThrowawayPostgres``)."""
    try:
        return pytestconfig.stash[_SHARED].get()
    except PostgresUnavailable as exc:
        if pg_required():
            pytest.fail(
                f"PostgreSQL is required here (CI / IMEISYNC_REQUIRE_PG=1) but unavailable: {exc}",
                pytrace=False,
            )
        pytest.skip(f"PostgreSQL not available: {exc}")
    except PostgresError as exc:
        pytest.fail(f"throwaway PostgreSQL server failed to start: {exc}", pytrace=False)


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"t_{worker}_{uuid.uuid4().hex[:12]}".lower()
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)  # WITH (FORCE): leftover connections are cut


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """URL of a not-yet-existing SQLite database file in the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'imeisync.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """URL of a fresh, empty database; the test runs once per backend."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")
