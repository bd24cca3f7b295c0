"""The TAC table: which device model each type allocation code (an IMEI's first 8 digits) names.

``import_tacs`` replaces the whole table from a CSV file shaped like GSMA's TAC export
(``tac,brand,model,...``; other columns kept as JSON) in one transaction, or refuses the file
with one line naming what is wrong and changes nothing. The table serves two purposes: device
names in confirmations, ``show``, the API and the console ("Apple iPhone 15, TAC 35xxxxxx"),
and catching a mistyped IMEI whose TAC was never allocated (``unknown_tac_ok`` to override; the
attach check's ``[eir] unknown_tac`` policy).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from imeisync.domain.errors import BadInput, Refused
from imeisync.services import audit
from imeisync.store.db import Database
from imeisync.store.models import ChangeLog, Tac

MAX_LINE = 4096  # bytes: a TAC line is short; a longer one is not a TAC file
MAX_FIELD = 200  # characters per brand / model / extra field
_REQUIRED = ("tac", "brand", "model")


@dataclass(frozen=True)
class TacImport:
    tacs: int  # in the new table
    added: int
    changed: int
    removed: int
    unchanged: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _bad(line: int, message: str) -> BadInput:
    return BadInput(f"TAC file line {line}: {message}; nothing was imported",
                    "fix the file (columns tac,brand,model,...) and import it again",
                    code="bad_tac_file")


def read_tac_file(path: Path) -> dict[str, tuple[str, str, str | None]]:
    """tac → (brand, model, extra JSON or None), every line checked before anything is kept."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}", code="bad_tac_file") from None
    if not raw.strip():
        raise BadInput(f"{path} is empty; nothing was imported", code="bad_tac_file")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if len(line) > MAX_LINE:
            raise _bad(number, f"is {len(line):,} bytes long (a TAC line is at most {MAX_LINE})")
    if b"\x00" in raw:
        raise _bad(raw[: raw.index(b"\x00")].count(b"\n") + 1, "holds a NUL byte")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad(raw[: exc.start].count(b"\n") + 1, "is not UTF-8") from None
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip().lower() for name in next(rows)]
    except (StopIteration, csv.Error):
        raise _bad(1, "has no header") from None
    if tuple(header[:3]) != _REQUIRED or len(set(header)) != len(header) or "" in header:
        raise _bad(1, f"header {','.join(header)[:80]!r} does not start with tac,brand,model "
                      "(or repeats or leaves out a column name)")
    extra_names = header[3:]
    table: dict[str, tuple[str, str, str | None]] = {}
    first_seen: dict[str, int] = {}
    try:
        for row in rows:
            number = rows.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise _bad(number, f"has {len(row)} fields, the header {len(header)} "
                                   "(a half-written or damaged file?)")
            tac, brand, model = (value.strip() for value in row[:3])
            if len(tac) != 8 or not (tac.isascii() and tac.isdigit()):
                raise _bad(number, f"TAC {tac[:20]!r} is not 8 digits")
            if tac in table:
                raise _bad(number, f"TAC {tac} appears again (first on line {first_seen[tac]})")
            if not brand or not model:
                raise _bad(number, f"TAC {tac} has no brand or no model")
            if any(len(value) > MAX_FIELD for value in row):
                raise _bad(number, f"a field is longer than {MAX_FIELD} characters")
            extra = ({name: value for name, value in zip(extra_names, row[3:], strict=True)}
                     if extra_names else None)
            table[tac] = (brand, model, json.dumps(extra, sort_keys=True) if extra else None)
            first_seen[tac] = number
    except csv.Error as exc:
        raise _bad(rows.line_num, f"is not valid CSV ({exc})") from None
    if not table:
        raise BadInput(f"{path} has a header but no TACs; nothing was imported",
                       code="bad_tac_file")
    return table


def import_tacs(db: Database, path: Path, *, actor: str, now: datetime) -> TacImport:
    """Replace the TAC table with the file's, atomically; the attach index reloads its TACs."""
    table = read_tac_file(path)
    with db.write() as session:
        old = {tac: (brand, model, extra) for tac, brand, model, extra in session.execute(
            select(Tac.tac, Tac.brand, Tac.model, Tac.extra))}
        added = sum(1 for tac in table if tac not in old)
        changed = sum(1 for tac, row in table.items() if tac in old and old[tac] != row)
        removed = sum(1 for tac in old if tac not in table)
        session.execute(delete(Tac.__table__))
        rows = [{"tac": tac, "brand": b, "model": m, "extra": e}
                for tac, (b, m, e) in table.items()]
        for start in range(0, len(rows), 5000):
            session.execute(insert(Tac.__table__), rows[start : start + 5000])
        # The attach index follows change_log: this row tells it to reload the TACs.
        session.execute(insert(ChangeLog.__table__).values(
            imei_key="", subject="tacs", op="import", kind=None, at=now))
        result = TacImport(len(table), added, changed, removed, len(table) - added - changed)
        audit.append(session, [audit.Event(actor=actor, role="admin", action="tac.import",
                                           outcome="ok", at=now,
                                           detail={"file": path.name, **result.as_dict()})])
    return result


# -- reading ---------------------------------------------------------------------------------


def device_names(session: Session, tacs: Iterable[str]) -> dict[str, str]:
    """tac → "Brand Model, TAC 12345678" for the TACs the table knows."""
    wanted = sorted(set(tacs))
    if not wanted:
        return {}
    return {tac: describe(tac, brand, model) for tac, brand, model in session.execute(
        select(Tac.tac, Tac.brand, Tac.model).where(Tac.tac.in_(wanted)))}


def describe(tac: str, brand: str, model: str) -> str:
    """'Apple iPhone 15, TAC 35xxxxxx'; the brand is left out when the model repeats it."""
    name = model if model.lower().startswith(brand.lower()) else f"{brand} {model}"
    return f"{name}, TAC {tac}"


def table_size(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(Tac)).scalar_one())


def check_known(session: Session, tacs: dict[str, str], *, confirmed: bool) -> None:
    """Refuse an order naming a TAC missing from a loaded table, unless ``confirmed``.

    ``tacs``: TAC → the IMEI as typed (for the message). No table loaded: nothing to check.
    """
    if confirmed or not tacs or table_size(session) == 0:
        return
    known = set(session.execute(select(Tac.tac).where(Tac.tac.in_(sorted(tacs)))).scalars())
    unknown = [tac for tac in tacs if tac not in known]
    if unknown:
        tac = unknown[0]
        raise Refused(
            f"TAC {tac} of IMEI {tacs[tac]} is not in the TAC table: no such device model is "
            "known, so the number is likely mistyped"
            + (f" ({len(unknown)} such TACs in this batch)" if len(unknown) > 1 else ""),
            "compare the IMEI with the police report; if it is right, confirm it with "
            "--unknown-tac-ok (console: the 'unknown TAC' box; API: \"unknown_tac_ok\": true)",
            code="unknown_tac", field="imei",
        )

