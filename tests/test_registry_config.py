"""The registry's configuration file: validated like the daemon's, refusing with one line that
names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imeisync.adapters.keys import generate_keypair
from imeisync.domain.errors import BadInput
from imeisync.registry.config import load_registry_config


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for kid in ("registry", "op-a", "op-b"):
        generate_keypair(kid, tmp_path / "keys")
    return tmp_path / "keys"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(text, encoding="utf-8")
    return path


def good(keys: Path, extra_server: str = "", extra_operator: str = "",
         receives: str = '"all"') -> str:
    return (f'[server]\nlisten = "127.0.0.1:8090"\nsigning_key = "{keys}/registry.key"\n'
            f'kid = "registry"\n{extra_server}'
            f'[[operators]]\nid = "op-a"\ncountry = "DK"\npublic_key = "{keys}/op-a.pub"\n'
            f'receives = {receives}\n{extra_operator}'
            f'[[operators]]\nid = "op-b"\ncountry = "SE"\npublic_key = "{keys}/op-b.pub"\n'
            'receives = "country"\n')


def test_a_complete_file_loads_members_keys_and_a_relative_database(tmp_path, keys):
    config = load_registry_config(write(tmp_path, good(keys, receives='["op-b"]')))
    assert config.port == 8090 and config.kid == "registry"
    assert config.database_url == f"sqlite:///{tmp_path}/var/registry.db"
    assert config.members["op-a"].receives == ("op-b",)
    assert config.members["op-a"].receives_from("op-b", "SE")
    assert not config.members["op-b"].receives_from("op-a", "DK")
    assert config.members["op-b"].public_key is not None and config.signing_key is not None


@pytest.mark.parametrize(("text", "message"), [
    ('[server]\nport = 1\n', r"unknown key 'port' in \[server\]"),
    ('[serveur]\n', r"unknown section \[serveur\]"),
    ('[server]\nlisten = 8090\n', r"\[server\] listen = 8090 is not valid"),
    ('[server]\nlisten = "nowhere"\n', "IP:PORT"),
])
def test_unknown_keys_and_wrong_types_are_refused_naming_file_and_key(tmp_path, keys, text,
                                                                       message):
    path = write(tmp_path, text + good(keys).split("\n", 4)[-1].replace("[server]", ""))
    with pytest.raises(BadInput, match=message) as caught:
        load_registry_config(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(("extra", "receives", "message"), [
    ('colour = "red"\n', '"all"', r"unknown key 'colour' in \[\[operators\]\] #1"),
    ("", '"everyone"', r'"all", "country", or a list'),
    ("", '["op-z"]', "not members: op-z"),
    ("", "3", r'"all", "country", or a list'),
])
def test_bad_members_are_refused(tmp_path, keys, extra, receives, message):
    with pytest.raises(BadInput, match=message):
        load_registry_config(write(tmp_path, good(keys, extra_operator=extra,
                                                  receives=receives)))


def test_a_member_listed_twice_or_with_a_missing_key_is_refused(tmp_path, keys):
    twice = good(keys).replace('id = "op-b"', 'id = "op-a"')
    with pytest.raises(BadInput, match="listed twice"):
        load_registry_config(write(tmp_path, twice))
    missing = good(keys).replace("op-b.pub", "op-q.pub")
    with pytest.raises(BadInput, match=r"op-b\) public_key: .*does not exist"):
        load_registry_config(write(tmp_path, missing))


def test_the_example_file_is_valid(tmp_path):
    example = Path(__file__).parent.parent / "config" / "registry.example.toml"
    config = load_registry_config(example, load_keys=False)
    assert config.members and config.listen
