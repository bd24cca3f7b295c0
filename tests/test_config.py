"""Configuration mistakes are refused at start: exit 2, one line naming the file and the key.

config.py: "an operator who mistypes max_shrink must hear about it, not run with the default".
Every case goes through the command line (``imeisync check``), which must fail before touching
the database; the happy paths (env overrides, relative paths) are checked on ``load_config``
and, where it matters, on where the command line really writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from imeisync.config import load_config
from imeisync.domain.errors import BadInput
from imeisync.entrypoints.cli import cli

IMEISYNC = Path(sys.executable).parent / "imeisync"
IMEI = "490154203237518"
NO_ENV = {k: None for k in os.environ if k.startswith("IMEISYNC_")}


def write(folder: Path, body: str, name: str = "imeisync.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body, encoding="utf-8")
    return path


def base(tmp_path: Path, url: str | None = None) -> str:
    url = url or f"sqlite:///{tmp_path / 'imeisync.db'}"
    return (f'[operator]\nid = "op-a"\ncountry = "DK"\n[database]\nurl = "{url}"\n'
            f'[security]\ndata_key_file = "{tmp_path / "data.key"}"\n')


def refused(args: list[str], env: dict[str, str | None] | None = None) -> str:
    """Run the CLI in-process; it must exit 2 with one line and no traceback."""
    result = CliRunner().invoke(cli, args, env={**NO_ENV, **(env or {})})
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("imeisync: ")
    return lines[0]


# -- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        pytest.param('[bogus]\nkey = 1\n', ["[bogus]", "known sections"], id="unknown-section"),
        pytest.param('[sync]\nmax_shrinkk = 0.3\n', ["'max_shrinkk'", "[sync]", "max_shrink"],
                     id="unknown-key"),
        pytest.param('[sync]\nmax_shrink = "lots"\n', ["[sync] max_shrink", "'lots'",
                                                     "fraction"], id="max_shrink-text"),
        pytest.param('[sync]\nmax_shrink = 1.5\n', ["[sync] max_shrink", "1.5"],
                     id="max_shrink-over-1"),
        pytest.param('[eir]\nworkers = "two"\n', ["[eir] workers", "'two'", "whole number"],
                     id="workers-text"),
        pytest.param('[police]\nallow_unsigned_blocks = 3\n',
                     ["[police] allow_unsigned_blocks", "3", "true or false"], id="bool-int"),
        pytest.param('[sync]\npull_interval = "5 minutes"\n',
                     ["[sync] pull_interval", "'5 minutes'", "30s, 5m"], id="bad-duration"),
        pytest.param('[sync]\npush_interval = 30\n', ["[sync] push_interval", "30"],
                     id="duration-without-unit"),
        pytest.param('[police]\nmax_order_age = "-1d"\n', ["[police] max_order_age"],
                     id="negative-duration"),
        pytest.param('[eir]\nlisten = "8080"\n', ["[eir] listen", "IP:PORT"], id="listen"),
        pytest.param('[api]\nlisten = "localhost:8081"\n', ["[api] listen", "IP:PORT"],
                     id="listen-name"),
        pytest.param('[eir]\nunknown_status = "BLACKLISTED"\n', ["[eir] unknown_status"],
                     id="unknown-status"),
        pytest.param('[sync]\nreconcile_at = "25:00"\n', ["[sync] reconcile_at", "HH:MM"],
                     id="time-of-day"),
        pytest.param('[eir]\nmax_inflight = 0\n', ["[eir] max_inflight", "at least 1"],
                     id="max-inflight-zero"),
        pytest.param('[eir]\nmax_inflight = "many"\n', ["[eir] max_inflight", "'many'"],
                     id="max-inflight-text"),
        pytest.param('[eir]\nper_client_share = 0\n', ["[eir] per_client_share", "above 0"],
                     id="share-zero"),
        pytest.param('[eir]\nper_client_share = 1.5\n', ["[eir] per_client_share", "1.5"],
                     id="share-over-1"),
    ],
)
def test_bad_config_exit_2_naming_file_and_key(tmp_path, extra, named):
    config = write(tmp_path, base(tmp_path) + extra)
    line = refused(["--config", str(config), "check", IMEI])
    for word in [str(config), *named]:
        assert word in line, f"{word!r} not in {line!r}"
    assert not (tmp_path / "imeisync.db").exists(), "a bad config must not touch the database"


def test_bad_operator_values_are_named(tmp_path):
    body = base(tmp_path).replace('country = "DK"', 'country = "Denmark"')
    line = refused(["--config", str(write(tmp_path, body)), "check", IMEI])
    assert "[operator] country" in line and "'Denmark'" in line and "ISO 3166" in line


def test_bad_toml_syntax_names_file_and_line(tmp_path):
    config = write(tmp_path, base(tmp_path) + '[sync]\npull_interval = 5m\n')
    line = refused(["--config", str(config), "check", IMEI])
    assert str(config) in line and "not valid TOML" in line and "line 9" in line


def test_section_that_is_not_a_table(tmp_path):
    config = write(tmp_path, "sync = 3\n" + base(tmp_path))
    line = refused(["--config", str(config), "check", IMEI])
    assert str(config) in line and "[sync]" in line and "table" in line


def test_config_that_is_not_utf8_is_refused(tmp_path):
    config = tmp_path / "imeisync.toml"
    config.write_bytes(base(tmp_path).encode() + b'[log]\nlevel = "\xff"\n')
    line = refused(["--config", str(config), "check", IMEI])
    assert str(config) in line


def test_named_config_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope" / "imeisync.toml"
    line = refused(["--config", str(missing), "check", IMEI])
    assert str(missing) in line and "does not exist" in line
    line = refused(["check", IMEI], env={"IMEISYNC_CONFIG": str(missing)})
    assert str(missing) in line


def test_env_override_with_unknown_key_is_refused(tmp_path):
    config = write(tmp_path, base(tmp_path))
    line = refused(["--config", str(config), "check", IMEI],
                   env={"IMEISYNC_SYNC_PULL_INTERVALL": "10m"})
    assert "IMEISYNC_SYNC_PULL_INTERVALL" in line and "no configuration key" in line


def test_env_override_with_bad_value_names_the_variable(tmp_path):
    config = write(tmp_path, base(tmp_path))
    line = refused(["--config", str(config), "check", IMEI],
                   env={"IMEISYNC_SYNC_PULL_INTERVAL": "soon"})
    assert "IMEISYNC_SYNC_PULL_INTERVAL" in line and "'soon'" in line


def test_the_real_command_refuses_without_traceback(tmp_path):
    """Through the console script: one line on stderr, exit 2, also with --json."""
    config = write(tmp_path, base(tmp_path) + '[eir]\nworkers = "two"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}
    done = subprocess.run([str(IMEISYNC), "--config", str(config), "check", IMEI],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert str(config) in done.stderr and "[eir] workers" in done.stderr
    done = subprocess.run([str(IMEISYNC), "--config", str(config), "--json", "check", IMEI],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "BadInput" and error["code"] == "bad_value"
    assert "[eir] workers" in error["message"]


# -- accepted -----------------------------------------------------------------------------


def test_env_override_is_applied(tmp_path):
    config = write(tmp_path, base(tmp_path) + '[sync]\npull_interval = "5m"\n')
    loaded = load_config(config, environ={"IMEISYNC_SYNC_PULL_INTERVAL": "10m"})
    assert loaded.get("sync", "pull_interval") == 600
    assert load_config(config, environ={}).get("sync", "pull_interval") == 300
    loaded = load_config(config, environ={"IMEISYNC_SYNC_MAX_SHRINK": "0.1",
                                          "IMEISYNC_POLICE_ALLOW_UNSIGNED_BLOCKS": "false",
                                          "IMEISYNC_EIR_WORKERS": "3"})
    assert loaded.get("sync", "max_shrink") == 0.1
    assert loaded.get("police", "allow_unsigned_blocks") is False
    assert loaded.get("eir", "workers") == 3


def test_env_override_reaches_the_command_line(tmp_path, database_url):
    """IMEISYNC_DATABASE_URL and IMEISYNC_OPERATOR_ID win over the file."""
    config = write(tmp_path, base(tmp_path, "sqlite:////nonexistent/never/used.db"))
    result = CliRunner().invoke(
        cli, ["--config", str(config), "order", "block", "--imei", IMEI, "--case", "C-1",
              "--unit", "KBH"],
        env={**NO_ENV, "IMEISYNC_DATABASE_URL": database_url, "IMEISYNC_OPERATOR_ID": "op-env"},
    )
    assert result.exit_code == 0, result.output
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            owners = conn.execute(text("SELECT owner_id FROM records")).scalars().all()
    finally:
        engine.dispose()
    assert owners == ["op-env"]


def test_program_variables_are_not_config_keys(tmp_path):
    """IMEISYNC_DEBUG (the CLI's own switch) and the test harness's variables are not refused."""
    config = write(tmp_path, base(tmp_path))
    env = {"IMEISYNC_DEBUG": "1", "IMEISYNC_REQUIRE_PG": "1", "IMEISYNC_PG_BINDIR": "/x"}
    assert load_config(config, environ=env).operator_id == "op-a"
    with pytest.raises(BadInput, match="IMEISYNC_SYNC_NOPE"):
        load_config(config, environ={**env, "IMEISYNC_SYNC_NOPE": "1"})


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    body = ('[database]\nurl = "sqlite:///var/imeisync.db"\n[police]\ntrusted_keys = "keys"\n'
            '[security]\ndata_key_file = "secret/data.key"\n'
            '[registry]\nsigning_key = "/abs/op.key"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter

    site = tmp_path / "site"
    loaded = load_config(write(site, body), environ={})
    assert loaded.get("police", "trusted_keys") == str(site / "keys")
    assert loaded.get("security", "data_key_file") == str(site / "secret" / "data.key")
    assert loaded.get("registry", "signing_key") == "/abs/op.key"
    assert loaded.database_url == f"sqlite:///{site / 'var' / 'imeisync.db'}"

    project = tmp_path / "project"  # a file in config/ resolves against the project root
    loaded = load_config(write(project / "config", body), environ={})
    assert loaded.get("police", "trusted_keys") == str(project / "keys")
    assert loaded.database_url == f"sqlite:///{project / 'var' / 'imeisync.db'}"

    # The command line really writes there, not in the working directory.
    result = CliRunner().invoke(
        cli, ["--config", str(project / "config" / "imeisync.toml"), "order", "block",
              "--imei", IMEI, "--case", "C-1", "--unit", "KBH"], env=NO_ENV)
    assert result.exit_code == 0, result.output
    assert (project / "var" / "imeisync.db").is_file()
    assert not list(elsewhere.iterdir())


def test_sqlite_uri_urls_are_left_as_written(tmp_path):
    """``sqlite:///file:…?mode=ro&uri=true`` is a URI, not a path relative to the config."""
    url = f"sqlite:///file:{tmp_path / 'db.sqlite'}?mode=ro&uri=true"
    config = write(tmp_path / "site", f'[database]\nurl = "{url}"\n')
    assert load_config(config, environ={}).database_url == url


def test_registry_kid_defaults_to_the_operator_id_and_a_different_one_is_refused(
    tmp_path: Path,
) -> None:
    from imeisync.config import load_config
    from imeisync.domain.errors import BadInput

    path = tmp_path / "imeisync.toml"
    path.write_text('[operator]\nid = "op-se"\ncountry = "SE"\n')
    assert load_config(path, environ={}).get("registry", "kid") == "op-se"

    path.write_text('[operator]\nid = "op-se"\ncountry = "SE"\n[registry]\nkid = "demo-op"\n')
    with pytest.raises(BadInput, match=r"\[registry\] kid = 'demo-op' differs"):
        load_config(path, environ={})
