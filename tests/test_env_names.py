"""The program's own IMEISYNC_* variables must never be read as configuration overrides.

A variable such as IMEISYNC_REGISTRY_CONFIG would fall in the [registry] section's namespace and
make every command refuse to start wherever it is exported.
"""

from __future__ import annotations

import re
from pathlib import Path

import imeisync
from imeisync.config import load_config

SOURCE = Path(imeisync.__file__).parent
NAME = re.compile(r"\"(IMEISYNC_[A-Z0-9_]+)\"")


def test_variables_the_program_sets_or_reads_are_not_taken_for_config_keys() -> None:
    names = {m for path in SOURCE.rglob("*.py") for m in NAME.findall(path.read_text())}
    assert "IMEISYNC_CONFIG" in names, "the scan finds the program's variables"
    for name in sorted(names - {"IMEISYNC_CONFIG"}):
        load_config(environ={name: "1"}, must_exist=False)  # raises if taken for a key
