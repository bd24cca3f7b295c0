"""CSV batch import: validated whole, applied all or nothing, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from imeisync.bootstrap import App
from imeisync.domain.errors import ImeisyncError
from imeisync.services.imports import ImportRejected, import_csv
from imeisync.services.orders import Actor
from imeisync.store import models
from support.fixtures_app import count

HEADER = "imei,case_ref,police_unit,reason,note\n"
STAFF = Actor("officer-17", "liaison", "import")


def write(tmp_path: Path, body: str, name: str = "orders.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + body, encoding="utf-8")
    return path


def test_valid_file_blocks_every_device_with_one_outbox_change_each(
    app: App, tmp_path: Path
) -> None:
    path = write(tmp_path, "352099001761481,C1,Unit A,stolen,\n"
                           "49-015420-323751-8,C2,Unit A,lost,left on a bus\n")

    report = import_csv(app.intake(), path, STAFF)

    assert report.accepted == 2
    assert count(app, models.Record, models.Record.closed_at.is_(None)) == 2
    assert count(app, models.OutboxChange) == 2
    assert count(app, models.AuditEvent) == 2
    assert count(app, models.Order, models.Order.channel == "import") == 2


def test_file_with_bad_lines_reports_every_one_with_its_number_and_applies_nothing(
    app: App, tmp_path: Path
) -> None:
    path = write(tmp_path, "352099001761481,C1,U,stolen,\n"
                           "352099001761482,C2,U,stolen,\n"   # line 3: bad check digit
                           "490154203237518,C3,U,recovered,\n"  # line 4: not a block reason
                           "354178036859789,C4,U\n"             # line 5: missing columns
                           "35209900176148-1,C5,U,stolen,\n")   # line 6: same device as line 2

    with pytest.raises(ImportRejected) as rejected:
        import_csv(app.intake(), path, STAFF)

    lines = [e.line for e in rejected.value.report.errors]
    assert lines == [3, 4, 5, 6]
    assert rejected.value.exit_code == 2, "malformed lines are bad input"
    messages = [e.message for e in rejected.value.report.errors]
    assert "expected 1" in messages[0]
    assert "line 2" in messages[3]
    assert count(app, models.Record) == 0
    assert count(app, models.OutboxChange) == 0
    assert count(app, models.Order) == 0


def test_importing_the_same_file_twice_is_refused_as_a_replay(app: App, tmp_path: Path) -> None:
    path = write(tmp_path, "352099001761481,C1,U,stolen,\n")
    import_csv(app.intake(), path, STAFF)

    with pytest.raises(ImportRejected, match="nothing was imported") as rejected:
        import_csv(app.intake(), path, STAFF)

    assert "already received" in rejected.value.report.errors[0].message
    assert rejected.value.exit_code == 1, "refused by a rule, not malformed"
    assert count(app, models.OutboxChange) == 1


def test_lines_for_devices_we_already_block_are_linked_not_blocked_twice(
    app: App, tmp_path: Path
) -> None:
    import_csv(app.intake(), write(tmp_path, "352099001761481,C1,U,stolen,\n", "a.csv"), STAFF)

    report = import_csv(app.intake(), write(
        tmp_path, "352099001761481,C9,U,stolen,\n490154203237518,C2,U,stolen,\n", "b.csv"), STAFF)

    assert (report.accepted, report.linked) == (1, 1)
    assert count(app, models.OutboxChange) == 2


def test_dry_run_validates_and_writes_nothing(app: App, tmp_path: Path) -> None:
    path = write(tmp_path, "352099001761481,C1,U,stolen,\n")

    report = import_csv(app.intake(), path, STAFF, dry_run=True)

    assert len(report.orders) == 1
    assert count(app, models.Record) == 0
    assert count(app, models.Order) == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"imei,case_ref\n352099001761481,C1\n", "header"),
        (HEADER.encode(), "no orders"),
        (HEADER.encode() + b'352099001761481,"C1\nC2",U,stolen,\n', "several lines"),
        (HEADER.encode() + b"352099001761481,C1,U,stolen,\xff\n", "UTF-8"),
    ],
)
def test_malformed_files_are_refused_with_a_reason(
    app: App, tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ImeisyncError) as error:
        import_csv(app.intake(), path, STAFF)
    text = str(error.value) + " ".join(
        str(e) for e in getattr(getattr(error.value, "report", None), "errors", []))
    assert expected in text
    assert count(app, models.Record) == 0


def test_bom_and_crlf_from_spreadsheet_programs_are_accepted(app: App, tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + HEADER.replace("\n", "\r\n").encode()
                     + b"352099001761481,C1,U,stolen,\r\n")
    assert import_csv(app.intake(), path, STAFF).accepted == 1


def test_import_is_refused_whole_when_policy_forbids_unsigned_blocks(
    app: App, tmp_path: Path
) -> None:
    intake = app.intake()
    intake.allow_unsigned_blocks = False
    path = write(tmp_path, "352099001761481,C1,U,stolen,\n")

    with pytest.raises(ImeisyncError, match="allow_unsigned_blocks") as refused:
        import_csv(intake, path, STAFF)

    assert refused.value.exit_code == 1
    assert count(app, models.Record) == 0
    assert count(app, models.OutboxChange) == 0
