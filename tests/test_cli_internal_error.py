"""A bug in the CLI: one line, exit 70 (EX_SOFTWARE), never a traceback unless asked for.

CONTRACT.md: exit 1 is a refusal by a rule; 70 is an internal error, so a script can tell "the
police order was refused" from "imeisync broke". No real input reaches a bug on purpose, so the
bug is planted: the key generator the command calls raises an exception nobody expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import imeisync.entrypoints.cli.keys as cli_keys
from imeisync.entrypoints.cli import cli


@pytest.fixture
def planted_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(kid: str, out: Path) -> tuple[Path, Path]:
        raise ZeroDivisionError("division by zero\nsecond line that must not be shown")

    monkeypatch.setattr(cli_keys, "generate_keypair", broken)


def keygen(tmp_path: Path, *options: str, debug: bool = False) -> object:
    env = {"IMEISYNC_DEBUG": "1" if debug else None}
    return CliRunner().invoke(cli, [*options, "keygen", "--kid", "op-a", "--out",
                                    str(tmp_path / "keys")], env=env)


def test_an_internal_error_exits_70_with_one_line(planted_bug: None, tmp_path: Path) -> None:
    result = keygen(tmp_path)
    assert result.exit_code == 70, result.output
    lines = result.output.splitlines()
    assert lines == [
        "imeisync: internal error (ZeroDivisionError: division by zero) — this is a bug: run "
        "again with IMEISYNC_DEBUG=1 and report the output"
    ]
    assert "Traceback" not in result.output
    assert not (tmp_path / "keys").exists()


def test_an_internal_error_in_json_names_its_kind(planted_bug: None, tmp_path: Path) -> None:
    result = keygen(tmp_path, "--json")
    assert result.exit_code == 70, result.output
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "InternalError"
    assert error["code"] == "internal_error"
    assert error["message"] == "internal error (ZeroDivisionError: division by zero)"


def test_debug_shows_the_traceback(planted_bug: None, tmp_path: Path) -> None:
    result = keygen(tmp_path, debug=True)
    assert result.exit_code == 70
    assert "Traceback (most recent call last)" in result.output
    assert "ZeroDivisionError" in result.output


def test_a_refusal_still_exits_1_and_bad_input_2(tmp_path: Path) -> None:
    """The planted bug aside, the neighbours keep their codes: 70 is for bugs only."""
    runner = CliRunner()
    bad_kid = runner.invoke(cli, ["keygen", "--kid", "../x", "--out", str(tmp_path)],
                            env={"IMEISYNC_DEBUG": None})
    assert bad_kid.exit_code == 2, bad_kid.output
    out = tmp_path / "keys"
    first = runner.invoke(cli, ["keygen", "--kid", "op-a", "--out", str(out)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["keygen", "--kid", "op-a", "--out", str(out)],
                          env={"IMEISYNC_DEBUG": None})
    assert again.exit_code == 1, again.output  # keys are never overwritten: a rule's refusal
