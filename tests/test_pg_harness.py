"""The database test harness itself: both backends connect, databases are isolated."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url


def _scalar(url: str, sql: str):
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar_one()
    finally:
        engine.dispose()


def test_database_url_connects(database_url: str, request: pytest.FixtureRequest) -> None:
    backend = make_url(database_url).get_backend_name()
    assert backend == request.node.callspec.params["database_url"]
    assert _scalar(database_url, "SELECT 1") == 1
    if backend == "postgresql":
        version = _scalar(database_url, "SELECT version()")
        assert "PostgreSQL" in version
        assert make_url(database_url).host == "127.0.0.1"


def test_postgres_variant_is_marked(database_url: str, request: pytest.FixtureRequest) -> None:
    is_pg = make_url(database_url).get_backend_name() == "postgresql"
    assert (request.node.get_closest_marker("postgres") is not None) == is_pg


def test_postgres_is_version_15(postgres_url: str, request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("postgres") is not None
    version = _scalar(postgres_url, "SELECT version()")
    assert version.startswith("PostgreSQL "), version
    major = int(_scalar(postgres_url, "SHOW server_version_num")) // 10000
    assert major >= 15, version


def test_postgres_settings(postgres_url: str) -> None:
    assert _scalar(postgres_url, "SHOW fsync") == "off"
    assert _scalar(postgres_url, "SHOW listen_addresses") == "127.0.0.1"
    assert _scalar(postgres_url, "SHOW server_encoding") == "UTF8"


def test_fresh_database_is_empty(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_two_postgres_databases_are_isolated(postgres_server, postgres_url: str) -> None:
    other_url = postgres_server.create_database()
    try:
        assert make_url(other_url).database != make_url(postgres_url).database
        first, second = create_engine(postgres_url), create_engine(other_url)
        try:
            with first.begin() as conn:
                conn.execute(text("CREATE TABLE marker (v integer)"))
                conn.execute(text("INSERT INTO marker VALUES (42)"))
            assert inspect(second).get_table_names() == []
            with second.begin() as conn:
                conn.execute(text("CREATE TABLE marker (v integer)"))  # no name clash
                assert conn.execute(text("SELECT count(*) FROM marker")).scalar_one() == 0
            assert _scalar(postgres_url, "SELECT v FROM marker") == 42
        finally:
            first.dispose()
            second.dispose()
    finally:
        postgres_server.drop_database(make_url(other_url).database)


@pytest.mark.parametrize("round_", [1, 2])
def test_database_url_is_fresh_each_test(database_url: str, round_: int) -> None:
    # Both rounds create the same table: would fail if a database were reused.
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE once (round integer)"))
            conn.execute(text("INSERT INTO once VALUES (:r)"), {"r": round_})
    finally:
        engine.dispose()


def test_sqlite_url_points_into_tmp_path(sqlite_url: str, tmp_path) -> None:
    url = make_url(sqlite_url)
    assert url.get_backend_name() == "sqlite"
    assert url.database == str(tmp_path / "imeisync.db")
