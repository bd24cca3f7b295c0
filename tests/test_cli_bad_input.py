"""Bad input through the command line: a clear refusal, the right exit code, nothing written.

Issue 2, "Bad input that must get a clear refusal and write nothing". Exit 2 is malformed input
(nothing at all is written); exit 1 is a well-formed order a rule refuses, which by design
(services/orders.py) leaves an order row and an audit event — so forged or mistaken orders are
visible — but never a record, an outbox change or a change_log row.

Each case compares the row counts of every table before and after.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from imeisync.adapters.keys import generate_keypair, load_private_key
from imeisync.adapters.police_jws import sign_order
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.entrypoints.cli import cli
from imeisync.services.orders import Actor

IMEISYNC = Path(sys.executable).parent / "imeisync"
KID = "police-dk-1"
TABLES = ("records", "outbox", "orders", "audit_events", "change_log")
GOOD = "354178036859789"
EXISTING = "490154203237518"  # blocked by the seed order
NO_ENV = {k: None for k in os.environ if k.startswith("IMEISYNC_")}
HEADER = "imei,case_ref,police_unit,reason,note"


class Site:
    def __init__(self, folder: Path, url: str):
        self.folder, self.url = folder, url
        keys, trusted = folder / "police", folder / "trusted"
        self.key, public = generate_keypair(KID, keys)
        self.rogue, _ = generate_keypair("rogue", keys)  # not among the trusted keys
        self.public_pem = public.read_bytes()
        trusted.mkdir()
        (trusted / public.name).write_bytes(self.public_pem)
        self.config = folder / "imeisync.toml"
        self.config.write_text(
            f'[operator]\nid = "op-a"\ncountry = "DK"\n[database]\nurl = "{url}"\n'
            f'[police]\ntrusted_keys = "{trusted}"\n'
            f'[security]\ndata_key_file = "{folder / "data.key"}"\n'
        )
        self._n = 0

    def run(self, *args: str, as_json: bool = False):
        prefix = ["--config", str(self.config)] + (["--json"] if as_json else [])
        return CliRunner().invoke(cli, [*prefix, *args], env=NO_ENV)

    def counts(self) -> dict[str, int]:
        return {t: self.scalar(f"SELECT count(*) FROM {t}") for t in TABLES}

    def scalar(self, sql: str) -> Any:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql)).scalar()
        finally:
            engine.dispose()

    def payload(self, **fields: Any) -> dict[str, Any]:
        self._n += 1
        order = {"order_id": f"ORD-{self._n}", "kind": "block", "imei": GOOD,
                 "case_ref": "CPH-2026-7", "police_unit": "Copenhagen Police",
                 "reason": "stolen", "issued_at": _stamp(datetime.now(UTC))}
        order.update(fields)
        return {k: v for k, v in order.items() if v is not ...}

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.folder / name
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    def submit(self, token: str, as_json: bool = False):
        return self.run("order", "submit", str(self.file("order.jws", token)), as_json=as_json)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _signed_raw(key: Path, head: str, payload: bytes) -> str:
    """A correctly signed token over any bytes (sign_order only signs JSON objects)."""
    body = _b64(payload)
    signature = load_private_key(key).sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


def _compact(header: dict, payload: dict, signature: bytes = b"") -> str:
    head = _b64(json.dumps(header).encode())
    body = _b64(json.dumps(payload).encode())
    return f"{head}.{body}.{_b64(signature)}"


@pytest.fixture
def site(tmp_path, database_url) -> Site:
    site = Site(tmp_path, database_url)
    app = App(load_config(site.config))
    try:
        app.intake().submit_unsigned({"imei": EXISTING, "case_ref": "CPH-1",
                                      "police_unit": "KBH", "reason": "stolen"}, Actor("seed"))
    finally:
        app.close()
    return site


def one_line(result, exit_code: int, *words: str) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("imeisync: "), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


def wrote_nothing(site: Site, before: dict[str, int], case: str) -> None:
    assert site.counts() == before, f"{case}: the database changed"


def wrote_refusal_only(site: Site, before: dict[str, int], code: str, case: str) -> None:
    after = site.counts()
    expected = {**before, "orders": before["orders"] + 1,
                "audit_events": before["audit_events"] + 1}
    assert after == expected, f"{case}: {after} != {expected}"
    last = site.scalar("SELECT outcome || ':' || refusal_code FROM orders "
                       "ORDER BY id DESC LIMIT 1")
    assert last == f"refused:{code}", case
    action = site.scalar("SELECT action FROM audit_events ORDER BY id DESC LIMIT 1")
    assert action == "order.refused", case


# -- IMEIs typed on the command line -------------------------------------------------------


@pytest.mark.parametrize(
    ("imei", "words"),
    [
        pytest.param("", ["empty"], id="empty"),
        pytest.param("49015420323751", ["14 digits", "all 15"], id="14-digits"),
        pytest.param("3568680000414120", ["16 digits", "IMEISV"], id="16-digits"),
        pytest.param("490154203237510", ["check digit is 0, expected 8"], id="bad-check"),
        pytest.param("49015420323751A", ["LATIN CAPITAL LETTER A", "position 15"],
                     id="letter"),
        pytest.param("49O154203237518", ["did you mean the digit 0"], id="letter-O"),
        pytest.param("٤٩٠١٥٤٢٠٣٢٣٧٥١٨", ["ARABIC-INDIC DIGIT FOUR", "position 1", "0-9"],
                     id="arabic-indic"),
        pytest.param("４９０１５４２０３２３７５１８", ["FULLWIDTH DIGIT FOUR", "0-9"],
                     id="full-width"),
        pytest.param("4" * 10_000, ["10000 characters"], id="10kB"),
    ],
)
def test_bad_imei_on_the_command_line(site, imei, words):
    before = site.counts()
    for args in (["order", "block", "--imei", imei, "--case", "C-1", "--unit", "KBH"],):
        line = one_line(site.run(*args), 2, *words)
        assert len(line) < 400, "the refusal must not echo 10 kB back"
    wrote_nothing(site, before, imei[:20])


def test_bad_text_fields_on_the_command_line(site):
    before = site.counts()
    cases = [
        (["--case", "x" * 10_000], ["'case_ref'", "10000 characters", "at most 64"]),
        (["--case", ""], ["'case_ref' is empty"]),
        (["--unit", "   "], ["'police_unit' is empty"]),
        (["--note", "n" * 10_000], ["'note'", "at most 2000"]),
    ]
    for extra, words in cases:
        args = {"--imei": GOOD, "--case": "C-1", "--unit": "KBH"}
        args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
        line = one_line(site.run("order", "block", *[x for kv in args.items() for x in kv]),
                        2, *words)
        assert len(line) < 400
    wrote_nothing(site, before, "text fields")


# -- signed orders whose payload is malformed: exit 2, nothing written ----------------------


def test_embedded_nul_in_a_json_order_file_signed_and_submitted(site):
    """argv cannot carry NUL; a JSON order file can. Signed with the real `police sign`."""
    order = site.file("order.json", json.dumps(site.payload(imei="49015420\u00003237518")))
    out = site.folder / "order.jws"
    result = site.run("police", "sign", "--key", str(site.key), "--kid", KID, str(order),
                      "--out", str(out))
    assert result.exit_code == 0, result.output
    before = site.counts()
    one_line(site.run("order", "submit", str(out)), 2, "'imei'", "control characters")
    wrote_nothing(site, before, "NUL")


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        pytest.param({"imei": 490154203237518}, ["'imei' must be text, got int"], id="imei-int"),
        pytest.param({"kind": ["block"]}, ["'kind' must be text, got list"], id="kind-list"),
        pytest.param({"case_ref": None}, ["'case_ref' must be text"], id="case-null"),
        pytest.param({"issued_at": 1_790_000_000}, ["'issued_at' must be text"],
                     id="issued-at-number"),
        pytest.param({"issued_at": "yesterday"}, ["'issued_at'", "RFC 3339"],
                     id="issued-at-malformed"),
        pytest.param({"issued_at": "2026-11-21T10:00:00"}, ["RFC 3339 time with a time zone"],
                     id="issued-at-no-zone"),
        pytest.param({"issued_at": "2026-02-30T10:00:00Z"}, ["RFC 3339"], id="issued-at-feb-30"),
        pytest.param({"kind": "delete"}, ["kind 'delete'"], id="kind-unknown"),
        pytest.param({"reason": "recovered"}, ["reason 'recovered'", "stolen"],
                     id="reason-for-other-kind"),
        pytest.param({"order_id": ...}, ["missing", "order_id"], id="field-missing"),
        pytest.param({"owner": "x"}, ["unknown field", "'owner'"], id="field-unknown"),
        pytest.param({"imei": "٤٩٠١٥٤٢٠٣٢٣٧٥١٨"}, ["ARABIC-INDIC"], id="imei-arabic-indic"),
        pytest.param({"imei": "4" * 10_000}, ["10000 characters"], id="imei-10kB"),
        pytest.param({"note": "n" * 10_000}, ["'note'", "at most 2000"], id="note-10kB"),
        pytest.param({"order_id": "../../etc"}, ["order_id", "not valid"], id="order-id"),
    ],
)
def test_malformed_signed_payload(site, fields, words):
    token = sign_order(site.payload(**fields), site.key, KID)
    before = site.counts()
    line = one_line(site.submit(token), 2, *words)
    assert len(line) < 500
    wrote_nothing(site, before, str(fields)[:40])


# -- tokens that are not JWS at all: exit 2, nothing written --------------------------------


def test_structurally_broken_tokens(site):
    good = sign_order(site.payload(), site.key, KID)
    head, body, _ = good.split(".")
    cases = {
        "truncated signature": good[:-10],
        "cut in half": good[: len(good) // 2],
        "two parts": f"{head}.{body}",
        "empty": "",
        "not base64": f"{head}.{body}.!!!",
        "payload not json": _signed_raw(site.key, head, b"not json"),
        "payload a list": _signed_raw(site.key, head, b"[1, 2]"),
        "payload with duplicate keys": _signed_raw(
            site.key, head, b'{"imei": "352099001761481", "imei": "356868000041418"}'),
        "binary": "\u00ff\u00fe",
    }
    before = site.counts()
    for case, token in cases.items():
        result = site.submit(token) if case != "binary" else site.run(
            "order", "submit", str(site.file("bin.jws", b"\xff\xfe\x00garbage")))
        assert result.exit_code == 2, (case, result.output)
        one_line(result, 2)
        wrote_nothing(site, before, case)
    # The 64 kB limit: refused before it is parsed.
    one_line(site.submit("a" * 70_000), 2, "64 kB")
    wrote_nothing(site, before, "70 kB")


# -- well-formed orders a rule refuses: exit 1, an order row and an audit event only --------


def test_refused_tokens_leave_a_visible_refusal_and_nothing_else(site):
    now = datetime.now(UTC)
    public_as_secret = site.public_pem
    hs_header = {"alg": "HS256", "kid": KID, "typ": "imeisync-order+jws"}
    hs_payload = site.payload()
    signing_input = (_b64(json.dumps(hs_header).encode()) + "."
                     + _b64(json.dumps(hs_payload).encode())).encode()
    hs_signature = hmac.new(public_as_secret, signing_input, hashlib.sha256).digest()

    def sign(**fields: Any) -> str:
        return sign_order(site.payload(**fields), site.key, KID)

    cases = [
        ("alg none", _compact({"alg": "none", "kid": KID}, site.payload()), "unsupported_alg",
         ["'none'", "Ed25519"]),
        ("HS256 with the public key as secret",
         _compact(hs_header, hs_payload, hs_signature), "unsupported_alg", ["'HS256'"]),
        ("unknown kid", sign_order(site.payload(), site.rogue, "rogue"), "unknown_kid",
         ["'rogue'", "not among the trusted"]),
        ("trusted kid, other key", sign_order(site.payload(), site.rogue, KID),
         "bad_signature", ["does not verify"]),
        ("no kid", _compact({"alg": "Ed25519"}, site.payload(), b"\x00" * 64), "unknown_kid",
         ["names no key"]),
        ("issued tomorrow", sign(issued_at=_stamp(now + timedelta(days=1))),
         "order_in_future", ["in the future"]),
        ("issued 8 days ago", sign(issued_at=_stamp(now - timedelta(days=8))),
         "order_too_old", ["older than the 7 days"]),
        ("lift of a device nobody blocks", sign(kind="lift", reason="recovered"),
         "no_record", ["nothing to lift"]),
    ]
    for case, token, code, words in cases:
        before = site.counts()
        one_line(site.submit(token), 1, *words)
        wrote_refusal_only(site, before, code, case)
    # A replayed order_id: the first is accepted, the replay refused.
    token = sign_order(site.payload(order_id="ORD-REPLAY"), site.key, KID)
    assert site.submit(token).exit_code == 0
    before = site.counts()
    one_line(site.submit(token), 1, "ORD-REPLAY", "already received")
    wrote_refusal_only(site, before, "replayed_order_id", "replay")


# -- CSV files -----------------------------------------------------------------------------


def _rows(*imeis: str, sep: str = "\n") -> str:
    return sep.join(f"{i},CPH-{n},KBH,stolen,note {n}" for n, i in enumerate(imeis))


def test_csv_files_that_are_refused(site):
    a, b = "352099001761481", "356868000041418"
    cases = {
        "missing header": (_rows(a, b) + "\n", ["header", HEADER]),
        "header in another order": ("case_ref,imei,police_unit,reason,note\n" + _rows(a) + "\n",
                                    ["header"]),
        "extra column": (f"{HEADER}\n{_rows(a)}\n{b},CPH-9,KBH,stolen,note,extra\n",
                         ["1 bad line(s) of 2", "nothing was imported"]),
        "missing column": (f"{HEADER}\n{b},CPH-9,KBH,stolen\n{_rows(a)}\n",
                           ["1 bad line(s)"]),
        "quoted newline": (f'{HEADER}\n{a},"CPH\n9",KBH,stolen,\n{b},CPH-8,KBH,stolen,\n',
                           ["bad line(s)"]),
        "duplicate IMEI": (f"{HEADER}\n{_rows(a, b)}\n35-209900-176148-1,CPH-3,KBH,lost,\n",
                           ["1 bad line(s) of 3"]),
        "bad IMEI among good ones": (f"{HEADER}\n{_rows(a, '490154203237510', b)}\n",
                                     ["1 bad line(s) of 3"]),
        "empty": ("", ["empty"]),
        "header only": (HEADER + "\n", ["no orders"]),
        "NUL byte": (f"{HEADER}\n{a},CPH\x00,KBH,stolen,\n", ["NUL"]),
        "10 kB field": (f"{HEADER}\n{a},{'x' * 10_000},KBH,stolen,\n", ["bytes long"]),
    }
    details = {"extra column": "line 3: has 6 columns", "missing column": "line 2: has 4",
               "quoted newline": "line 2: a field spans several lines",
               "duplicate IMEI": "line 4: IMEI 352099001761481 is already on line 2",
               "bad IMEI among good ones": "line 3: IMEI 490154203237510: check digit"}
    before = site.counts()
    for case, (content, words) in cases.items():
        path = site.file("batch.csv", content)
        result = site.run("order", "import", str(path))
        assert result.exit_code == 2, (case, result.output)
        assert "Traceback" not in result.output
        lines = result.stderr.rstrip("\n").splitlines()
        assert lines[0].startswith("imeisync: "), (case, lines)
        for word in words:
            assert word in lines[0], (case, word, lines[0])
        # The summary, then one indented line per bad line of the file, nothing else.
        assert all(line.startswith("  line ") for line in lines[1:]), (case, lines)
        if case in details:
            assert any(details[case] in line for line in lines[1:]), (case, lines)
        else:
            assert len(lines) == 1, (case, lines)
        wrote_nothing(site, before, case)
    # Not UTF-8 (a spreadsheet's Latin-1 export).
    path = site.file("batch.csv", f"{HEADER}\n{a},Bøgevej,KBH,stolen,\n".encode("latin-1"))
    one_line(site.run("order", "import", str(path)), 2, "line 2 is not UTF-8")
    wrote_nothing(site, before, "latin-1")


def test_csv_with_a_50_mb_line_is_refused_quickly(site):
    path = site.folder / "huge.csv"
    with open(path, "wb") as handle:
        handle.write(f"{HEADER}\n352099001761481,".encode())
        handle.write(b"x" * (50 * 2**20))
        handle.write(b",KBH,stolen,\n")
    before = site.counts()
    started = time.monotonic()
    line = one_line(site.run("order", "import", str(path)), 2, "line 2 is", "bytes long")
    assert time.monotonic() - started < 10
    assert len(line) < 300
    wrote_nothing(site, before, "50 MB line")


@pytest.mark.parametrize(
    ("bom", "newline"),
    [pytest.param(b"\xef\xbb\xbf", "\n", id="BOM"), pytest.param(b"", "\r\n", id="CRLF"),
     pytest.param(b"\xef\xbb\xbf", "\r\n", id="BOM+CRLF")],
)
def test_csv_with_bom_or_crlf_is_imported(site, bom, newline):
    numbers = ["352099001761481", "356868000041418"]
    content = bom + (HEADER + newline + _rows(*numbers, sep=newline) + newline).encode()
    before = site.counts()
    result = site.run("order", "import", str(site.file("batch.csv", content)))
    assert result.exit_code == 0, result.output
    after = site.counts()
    assert after == {t: before[t] + 2 for t in TABLES}
    for number in numbers:  # the first IMEI is not "\ufeff35…", the note not "note 1\r"
        assert site.run("check", number).stdout.strip() == "BLACKLISTED"
    shown = json.loads(site.run("show", numbers[1], as_json=True).stdout)
    assert shown["records"][0]["note"] == "note 1"
    assert shown["records"][0]["case_ref"] == "CPH-1"


# -- --json error output -------------------------------------------------------------------


def test_json_errors_are_valid_json_with_kind_code_message_hint(site, tmp_path):
    rogue = sign_order(site.payload(), site.rogue, "rogue")
    cases = [
        (site.run("order", "block", "--imei", "490154203237510", "--case", "C", "--unit", "U",
                  as_json=True), 2, "BadInput", "imei_checksum"),
        (site.submit(rogue, as_json=True), 1, "Refused", "unknown_kid"),
        (site.submit("abc.def", as_json=True), 2, "BadInput", "malformed_jws"),
    ]
    broken = tmp_path / "broken.toml"
    broken.write_text(site.config.read_text().replace(
        site.url, f"sqlite:///{site.key}/sub/db.sqlite"))  # a folder under a file
    cases.append((CliRunner().invoke(cli, ["--config", str(broken), "--json", "order", "block",
                                           "--imei", GOOD, "--case", "C", "--unit", "U"],
                                     env=NO_ENV), 3, "Unavailable", None))
    for result, exit_code, kind, code in cases:
        assert result.exit_code == exit_code, result.output
        error = json.loads(result.stdout)["error"]
        assert error["kind"] == kind and error["code"] == code, error
        assert error["message"] and error["hint"], error
        assert set(error) >= {"kind", "code", "message", "hint"}


def test_json_errors_from_the_real_command(site):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}
    path = site.file("batch.csv", f"{HEADER}\n352099001761481,C,KBH,stolen,\n490154203237510,"
                                  "C,KBH,stolen,\n")
    done = subprocess.run([str(IMEISYNC), "--config", str(site.config), "--json", "order",
                           "import", str(path)], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "BadInput" and error["code"] == "bad_csv"
    assert error["message"] and error["hint"]
    assert any(d.startswith("line 3: IMEI 490154203237510") for d in error["details"])
    assert "Traceback" not in done.stderr
