"""``python -m imeisync.entrypoints.daemon eir [--config PATH]``: a child of the supervisor."""

from __future__ import annotations

import argparse
import sys

from imeisync.domain.errors import ImeisyncError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imeisync.entrypoints.daemon")
    parser.add_argument("role", choices=["eir"])
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    try:
        from imeisync.entrypoints.daemon.children import eir_child_main

        eir_child_main(args.config)
    except ImeisyncError as error:
        print(f"imeisync: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
