"""`imeisync check` and `show` read what a person types with the same rule as the API."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from imeisync.bootstrap import App
from imeisync.entrypoints.cli import cli


@pytest.mark.parametrize("command", ["check", "show"])
def test_a_mistyped_check_digit_is_refused_not_silently_matched(
    operator_config: Path, command: str
) -> None:
    result = CliRunner().invoke(cli, ["--config", str(operator_config), command,
                                      "490154203237510"])
    assert result.exit_code == 2
    assert "expected 8" in result.output


@pytest.mark.parametrize("form", ["49-015420-323751-8", "49015420323751", "imei-490154203237510",
                                  "imeisv-4901542032375123"])
def test_network_forms_and_typed_forms_find_the_same_device(
    operator_config: Path, form: str
) -> None:
    result = CliRunner().invoke(cli, ["--config", str(operator_config), "--json", "check", form])
    assert result.exit_code == 0, result.output
    assert '"imei_key": "49015420323751"' in result.output


def test_check_with_the_excepted_imsi_answers_whitelisted_for_that_subscriber_only(
    app: App, operator_config: Path
) -> None:
    from imeisync.services import exceptions
    from imeisync.services.orders import Actor

    app.intake().submit_unsigned({"imei": "490154203237518", "case_ref": "C1",
                                  "police_unit": "U1", "reason": "stolen"}, Actor("officer-17"))
    exceptions.add(app.db, imei="490154203237518", imsi="238010000000001", case_ref="C1",
                   actor=Actor("admin-1", "admin"))

    def check(*extra: str) -> str:
        result = CliRunner().invoke(cli, ["--config", str(operator_config), "check",
                                          "490154203237518", *extra])
        return result.output.strip()

    assert check("--imsi", "imsi-238010000000001") == "WHITELISTED"
    assert check("--imsi", "238010000000002") == "BLACKLISTED"
    assert check() == "BLACKLISTED"
