"""The typed configuration: each section a frozen dataclass built once at load, from the same
validated values (file, defaults and ``IMEISYNC_<SECTION>_<KEY>`` overrides) as ``get``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from imeisync.config import SCHEMA, load_config
from imeisync.config_sections import Listen
from imeisync.domain.errors import BadInput
from imeisync.entrypoints.cli import cli

NO_ENV = {k: None for k in os.environ if k.startswith("IMEISYNC_")}


def write(folder: Path, body: str) -> Path:
    path = folder / "imeisync.toml"
    path.write_text(body, encoding="utf-8")
    return path


def base(tmp_path: Path) -> str:
    return (f'[operator]\nid = "op-a"\ncountry = "DK"\n[database]\n'
            f'url = "sqlite:///{tmp_path / "imeisync.db"}"\n')


def refused(args: list[str]) -> str:
    """The CLI exits 2 with one line, like every other configuration mistake."""
    result = CliRunner().invoke(cli, args, env=NO_ENV)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imeisync: "), lines
    return lines[0]


def test_every_key_of_the_schema_is_a_typed_field(tmp_path):
    loaded = load_config(write(tmp_path, base(tmp_path)), environ={})
    for section, keys in SCHEMA.items():
        typed = getattr(loaded, section)
        assert dataclasses.is_dataclass(typed)
        assert {f.name for f in dataclasses.fields(typed)} == set(keys), section
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.sync.max_shrink = 1.0  # type: ignore[misc]


def test_values_are_parsed_once_into_their_types(tmp_path):
    body = base(tmp_path) + ('[eir]\nlisten = "[::1]:8443"\n[s13]\nlisten = "127.0.0.1:3868"\n'
                             'peers = ["mme1.example"]\n[sync]\nreconcile_at = "04:05"\n')
    loaded = load_config(write(tmp_path, body), environ={"IMEISYNC_SYNC_PULL_INTERVAL": "10m"})
    assert loaded.eir.listen == Listen("::1", 8443, "[::1]:8443")
    assert loaded.s13.listen is not None and loaded.s13.listen.address == ("127.0.0.1", 3868)
    assert loaded.s13.peers == ("mme1.example",)
    assert loaded.sync.reconcile_at == (4, 5)
    assert loaded.sync.pull_interval == 600.0 == loaded.get("sync", "pull_interval")
    assert loaded.api.listen.address == ("127.0.0.1", 8081)  # the default


def test_s13_listen_empty_is_none(tmp_path):
    assert load_config(write(tmp_path, base(tmp_path)), environ={}).s13.listen is None


@pytest.mark.parametrize("section", ["eir", "api"])
def test_half_a_tls_pair_is_refused_at_load(tmp_path, section):
    config = write(tmp_path, base(tmp_path) + f'[{section}]\ntls_cert = "cert.pem"\n')
    with pytest.raises(BadInput, match=rf"\[{section}\] tls_cert and tls_key must be set"):
        load_config(config, environ={})
    line = refused(["--config", str(config), "check", "490154203237518"])
    assert f"[{section}] tls_cert and tls_key must be set together" in line


def test_a_missing_tls_file_is_named_where_it_is_used(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    config = write(tmp_path, base(tmp_path) + f'[api]\ntls_cert = "{cert}"\n'
                   f'tls_key = "{tmp_path / "nope.pem"}"\n')
    loaded = load_config(config, environ={})
    with pytest.raises(BadInput, match=r"\[api\] tls_key .*nope.pem does not exist"):
        loaded.api.tls_files()
    assert loaded.eir.tls_files() is None



def test_sightings_section_defaults_and_parsing(tmp_path):
    config = load_config(write(tmp_path, base(tmp_path)), environ={})
    assert config.sightings.dedupe == 15 * 60
    assert config.sightings.retention_days == 90
    assert config.sightings.blocked_attempts is False
    assert config.sightings.webhook_url == ""
    assert config.sightings.queue_size == 10000
    body = base(tmp_path) + ('[sightings]\ndedupe = "1h"\nwebhook_url = "https://police.example/a"'
                             '\nwebhook_key = "keys/alerts.key"\n')
    config = load_config(write(tmp_path, body), environ={})
    assert config.sightings.dedupe == 3600
    assert config.sightings.webhook_key == str(tmp_path / "keys" / "alerts.key")  # resolved


@pytest.mark.parametrize("body, says", [
    ('webhook_url = "https://police.example/a"\n', "webhook_url and webhook_key must be set"),
    ('webhook_url = "ftp://police.example/a"\nwebhook_key = "k"\n', "http:// or https:// URL"),
    ('dedupe = "soon"\n', "[sightings] dedupe"),
    ('queue_size = 0\n', "[sightings] queue_size"),
])
def test_bad_sightings_values_are_refused_in_one_line(tmp_path, body, says):
    path = write(tmp_path, base(tmp_path) + "[sightings]\n" + body)
    assert says in refused(["--config", str(path), "check", "490154203237518"])
