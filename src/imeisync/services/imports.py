"""Batch import of block orders from CSV: validate every line first, then all or nothing.

Columns ``imei,case_ref,police_unit,reason,note``. Every bad line is reported with its number
and reason; if any line is bad nothing is applied, so the person fixes the file and runs it
again. Each line becomes a block order whose ``order_id`` is derived from the file's content
and the line number: importing the same file twice is refused as a replay, not applied twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from imeisync.domain.errors import BadInput, ImeisyncError, Refused
from imeisync.domain.orders import Order, parse_order
from imeisync.domain.ranges import DEFAULT_MAX_RANGE
from imeisync.domain.times import rfc3339
from imeisync.services.orders import Actor, BatchRefused, OrderIntake, OrderOutcome

COLUMNS = ("imei", "case_ref", "police_unit", "reason", "note")
# Optional last column: a range's last IMEI (the line's imei is its first); empty for one device.
RANGE_COLUMN = "imei_last"
MAX_LINE_BYTES = 8192  # a real line is < 300 bytes; a 50 MB "line" is an error, not data
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_ERRORS_KEPT = 1000  # report them all, but keep memory bounded on a garbage file


@dataclass
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ImportReport:
    file: str
    lines: int = 0
    orders: list[Order] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    outcomes: list[OrderOutcome] = field(default_factory=list)

    def add_error(self, line: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(LineError(line, message))

    @property
    def accepted(self) -> int:
        return sum(1 for o in self.outcomes if o.outcome == "accepted")

    @property
    def linked(self) -> int:
        return sum(1 for o in self.outcomes if o.outcome == "linked")


class ImportRejected(BadInput):
    """The file has bad lines; nothing was applied."""

    def __init__(self, report: ImportReport, *, by_rule: bool = False):
        more = report.error_count - len(report.errors)
        what = "line(s) refused" if by_rule else "bad line(s)"
        super().__init__(
            f"{report.file}: {report.error_count} {what} of {report.lines}; "
            "nothing was imported" + (f" ({more} more not listed)" if more > 0 else ""),
            "fix the lines listed and run the import again",
            code="refused" if by_rule else "bad_csv",
        )
        self.report = report
        # Well-formed lines that a rule refused (a replayed file, a kind conflict) exit 1 like a
        # single refused order; malformed ones exit 2.
        self.exit_code = Refused.exit_code if by_rule else BadInput.exit_code


def _read_lines(data: bytes, report: ImportReport) -> Iterator[tuple[int, list[str]]]:
    """Physical-line-aware CSV reading; yields (line number, fields)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # spreadsheet programs write a UTF-8 BOM; it is not part of "imei"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BadInput(
            f"{report.file}: line {line} is not UTF-8 text",
            "save the file as CSV UTF-8",
            code="bad_csv",
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise BadInput(f"{report.file}: line {line} contains a NUL byte; this is not a CSV file",
                       code="bad_csv")
    lines = io.StringIO(text, newline="")
    reader = csv.reader(lines, strict=True)
    line_no = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise BadInput(f"{report.file}: line {start}: not valid CSV ({exc})",
                           code="bad_csv") from None
        line_no = start
        if reader.line_num != start:
            report.add_error(start, "a field spans several lines (a quoted newline); "
                                    "each order must be on one line")
            continue
        yield line_no, row


def validate_csv(
    path: Path, *, now: datetime, max_age: timedelta,
    progress: Callable[[int], None] | None = None, max_range: int = DEFAULT_MAX_RANGE,
) -> ImportReport:
    """Read and validate the whole file; returns a report with orders or errors."""
    report = ImportReport(file=str(path))
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise BadInput(f"{path}: {size // 2**20} MiB is larger than an import may be "
                           f"({MAX_FILE_BYTES // 2**20} MiB)", "split the file", code="bad_csv")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file", code="bad_csv") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a folder, not a CSV file", code="bad_csv") from None
    except PermissionError:
        raise BadInput(f"{path}: cannot be read (permission denied)", code="bad_csv") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise BadInput(
                f"{path}: line {number} is {len(raw)} bytes long; a line may be at most "
                f"{MAX_LINE_BYTES}", "this does not look like an order file", code="bad_csv",
            )
    rows = _read_lines(data, report)
    header = next(rows, None)
    if header is None:
        raise BadInput(f"{path}: the file is empty",
                       f"the first line must be the header {','.join(COLUMNS)}", code="bad_csv")
    header_no, names = header
    names = [n.strip().lower() for n in names]
    if tuple(names) not in (COLUMNS, (*COLUMNS, RANGE_COLUMN)):
        raise BadInput(
            f"{path}: line {header_no}: the header is {','.join(names)[:80]!r}",
            f"the first line must be exactly {','.join(COLUMNS)} (optionally ,{RANGE_COLUMN})",
            code="bad_csv",
        )
    width = len(names)
    first_line_of: dict[str, int] = {}
    # Content-derived order ids: the same file imported twice replays the same ids.
    file_digest = hashlib.sha256(data).hexdigest()[:16]
    step = 0
    for line, fields in rows:
        report.lines += 1
        step += 1
        if progress and step == 1000:
            progress(step)
            step = 0
        if not any(f.strip() for f in fields):
            continue  # a blank line, e.g. at the end
        if len(fields) != width:
            report.add_error(line, f"has {len(fields)} columns; expected {width} "
                                   f"({','.join(names)})")
            continue
        imei, case_ref, unit, reason, note, *rest = (f.strip() for f in fields)
        device: dict[str, object] = ({"imei_range": {"first": imei, "last": rest[0]}}
                                     if rest and rest[0] else {"imei": imei})
        payload: dict[str, object] = {
            "order_id": f"csv-{file_digest}-{line}", "kind": "block", **device,
            "case_ref": case_ref, "police_unit": unit, "reason": reason,
            "issued_at": rfc3339(now),
        }
        if note:
            payload["note"] = note
        try:
            order = parse_order(payload, now=now, max_age=max_age, max_range=max_range)
        except ImeisyncError as exc:
            report.add_error(line, str(exc))
            continue
        if order.imei_key in first_line_of:
            report.add_error(line, f"IMEI {order.imei} is already on line "
                                   f"{first_line_of[order.imei_key]}; each device once per file")
            continue
        first_line_of[order.imei_key] = line
        report.orders.append(order)
    if progress and step:
        progress(step)
    if report.lines == 0 and not report.error_count:
        raise BadInput(f"{path}: the file has a header but no orders", code="bad_csv")
    return report


def import_csv(
    intake: OrderIntake, path: Path, actor: Actor, *, dry_run: bool = False,
    progress: Callable[[int], None] | None = None, unknown_tac_ok: bool = False,
) -> ImportReport:
    report = validate_csv(path, now=intake.clock(), max_age=intake.max_order_age,
                          progress=progress, max_range=intake.max_range)
    if report.error_count:
        raise ImportRejected(report)
    if dry_run:
        return report
    try:
        report.outcomes = intake.apply(report.orders, actor, progress=progress,
                                       unknown_tac_ok=unknown_tac_ok)
    except BatchRefused as exc:
        lines = {o.order_id: int(o.order_id.rsplit("-", 1)[1]) for o in report.orders}
        for index, error in exc.problems:
            report.add_error(lines[report.orders[index].order_id], str(error))
        raise ImportRejected(report, by_rule=True) from None
    return report
