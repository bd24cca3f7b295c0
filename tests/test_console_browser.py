"""The web console in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against real servers on loopback — a reference registry and two operators, op-dk
(Denmark) and op-se (Sweden), each serving its police API and console.

Locally these tests skip when /usr/bin/chromium is missing (``./scripts/test`` installs it when
run as root); in CI (``CI`` set) a missing browser fails them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from support.console_lab import ConsoleLab, ConsoleServer, browser_missing, launch
from support.fixtures_api import imei

SCRIPT = '<script>alert("x")</script>'


def _in_ci() -> bool:
    return os.environ.get("CI", "") not in ("", "0", "false")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = browser_missing()
    if missing:
        if _in_ci():
            pytest.fail(f"browser tests must run in CI: {missing}", pytrace=False)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def lab(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleLab]:
    with ConsoleLab(tmp_path_factory.mktemp("console"), [("op-dk", "DK"),
                                                          ("op-se", "SE")]) as lab:
        dk, se = lab.console("op-dk"), lab.console("op-se")
        lab.tokens = {"dk": dk.token("anna"), "se": se.token("erik"),  # type: ignore[attr-defined]
                      "dk-auditor": dk.token("ida", "auditor")}
        yield lab


@pytest.fixture
def dialogs() -> Iterator[list[str]]:
    """Every JavaScript dialog any page opened: there must be none (no script runs)."""
    opened: list[str] = []
    yield opened
    assert opened == [], f"a page ran script: {opened}"


class Person:
    """One person in one browser context, signed in to one operator's console."""

    def __init__(self, browser: Any, server: ConsoleServer, token: str, dialogs: list[str]):
        self.server = server
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        self.token = token

    def sign_in(self) -> Person:
        self.page.goto(self.server.url + "/signin")
        self.page.get_by_label("Your token").fill(self.token)
        self.page.get_by_role("button", name="Sign in").click()
        assert "Signed in as" in self.page.content()
        return self

    def go(self, path: str) -> Any:
        self.page.goto(self.server.url + path)
        return self.page

    def block(self, number: str, *, case: str = "CPH-2026-118", note: str = "") -> Any:
        page = self.go("/block")
        page.get_by_label("IMEI").fill(number)
        page.get_by_label("Police case reference").fill(case)
        page.get_by_label("Police unit").fill("Copenhagen Police")
        page.get_by_label("Stolen").check()
        if note:
            page.get_by_label("Note for colleagues").fill(note)
        page.get_by_role("button", name="Block this device").click()
        return page

    def upload(self, token: str, tmp_path: Path, path: str = "/upload",
               button: str = "Apply the order") -> Any:
        page = self.go(path) if path else self.page
        order = tmp_path / "order.jws"
        order.write_text(token)
        page.get_by_label("Signed order file").set_input_files(str(order))
        page.get_by_role("button", name=button).click()
        return page

    def status(self, number: str) -> str:
        page = self.go(f"/lookup?imei={number}")
        return page.locator(".verdict .status").inner_text()

    def close(self) -> None:
        self.context.close()


def person(browser: Any, lab: ConsoleLab, who: str, dialogs: list[str]) -> Person:
    server = lab.consoles["op-se" if who == "se" else "op-dk"]
    return Person(browser, server, lab.tokens[who], dialogs).sign_in()  # type: ignore[attr-defined]


# -- signing in ----------------------------------------------------------------------------------


def test_a_signed_out_user_is_sent_to_sign_in_and_then_to_the_page_asked_for(
        browser: Any, lab: ConsoleLab, dialogs: list[str]) -> None:
    anna = Person(browser, lab.consoles["op-dk"], lab.tokens["dk"], dialogs)  # type: ignore
    page = anna.go("/orders?all=1")
    assert "/signin?next=" in page.url
    page.get_by_label("Your token").fill(anna.token)
    page.get_by_role("button", name="Sign in").click()
    assert page.url.endswith("/orders?all=1")
    page.get_by_role("button", name="Sign out").click()
    assert "You are signed out" in page.content()
    assert "/signin" in anna.go("/").url
    anna.close()


def test_sign_in_works_from_the_keyboard_and_an_error_takes_the_focus(
        browser: Any, lab: ConsoleLab, dialogs: list[str]) -> None:
    anna = Person(browser, lab.consoles["op-dk"], lab.tokens["dk"], dialogs)  # type: ignore
    page = anna.go("/signin")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type("isk_wrong")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    # Browsers apply `autofocus` at their next rendering step, which may come just after the
    # load event: wait for it, up to 3 s. (Not wait_for_function: it evals a string, and the
    # console's Content-Security-Policy rightly forbids that.)
    deadline = time.monotonic() + 3
    while page.evaluate("document.activeElement.className") != "error-summary":
        assert time.monotonic() < deadline, "the error summary never took the focus"
        page.wait_for_timeout(50)
    assert "was not recognised" in page.locator(".error-summary").inner_text()
    described = page.get_attribute("#token", "aria-describedby")
    assert described == "token-error"
    page.get_by_role("link", name="That token was not recognised", exact=False).click()
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type(anna.token)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "Signed in as" in page.content()
    anna.close()


# -- a report from submission to another operator's BLACKLISTED ---------------------------------


def test_a_block_submitted_here_is_blacklisted_here_and_at_the_other_operator(
        browser: Any, lab: ConsoleLab, dialogs: list[str]) -> None:
    anna, erik = person(browser, lab, "dk", dialogs), person(browser, lab, "se", dialogs)
    number = imei(501)
    page = anna.block(number, note="Seen on the metro " + SCRIPT)
    assert "Accepted" in page.locator("[role=status]").inner_text()
    assert page.locator("[role=status] .status").inner_text() == "BLACKLISTED"
    assert anna.status(number) == "BLACKLISTED"
    assert SCRIPT in anna.page.locator(".note").inner_text()  # shown as text
    assert erik.status(number) != "BLACKLISTED"  # not yet: the registry has not carried it

    lab.sync("op-dk", "op-se")

    assert erik.status(number) == "BLACKLISTED"
    foreign = erik.page.locator("table").inner_text()
    assert "op-dk" in foreign and "DK" in foreign and "Stolen" in foreign
    assert "CPH-2026-118" not in erik.page.content()  # no case details abroad
    assert "metro" not in erik.page.content()
    page = anna.go("/orders")
    page.get_by_role("link", name=page.locator("tbody tr a").first.inner_text()).click()
    assert "Confirmed by the registry" in page.locator(".lead").inner_text()
    anna.close()
    erik.close()


def test_an_uploaded_signed_lift_unblocks_the_device(
        browser: Any, lab: ConsoleLab, dialogs: list[str], tmp_path: Path) -> None:
    anna = person(browser, lab, "dk", dialogs)
    number = imei(502)
    page = anna.upload(lab.police_order("block", number), tmp_path)
    assert page.locator("[role=status] .status").inner_text() == "BLACKLISTED"
    page = anna.upload(lab.police_order("lift", number), tmp_path)
    assert "The lift of IMEI" in page.locator("[role=status]").inner_text()
    assert anna.status(number) == "WHITELISTED"
    # a lift nobody can apply is refused in plain words, next to the upload field
    page = anna.upload(lab.police_order("lift", imei(503)), tmp_path)
    error = page.locator("#order_file-error").inner_text()
    assert "no open record" in error and "nothing to lift" in error
    assert page.get_attribute("#order_file", "aria-invalid") == "true"
    anna.close()


# -- disputes across two operators and the registry --------------------------------------------


def _file_dispute(erik: Person, number: str, reason: str) -> None:
    page = erik.go(f"/lookup?imei={number}")
    page.get_by_role("link", name="File a dispute").click()
    page.get_by_label("Your police case reference").fill("STH-2026-5521")
    page.get_by_label("Why the block is wrong").fill(reason)
    page.get_by_role("button", name="File the dispute").click()
    assert "Dispute filed" in page.content()


def test_a_dispute_filed_abroad_is_answered_by_a_police_lift_and_both_sides_see_it(
        browser: Any, lab: ConsoleLab, dialogs: list[str], tmp_path: Path) -> None:
    anna, erik = person(browser, lab, "dk", dialogs), person(browser, lab, "se", dialogs)
    number = imei(504)
    anna.block(number)
    lab.sync("op-dk", "op-se")
    _file_dispute(erik, number, "Bought new in Stockholm; the report's IMEI was mistyped. "
                  + SCRIPT)
    lab.sync("op-se", "op-dk")

    page = anna.go("/")
    assert "1 waiting" in page.locator("nav").inner_text()
    page = anna.go("/disputes")
    row = page.locator("tr", has_text=f"{number[:2]}-{number[2:8]}")
    assert "op-se (SE)" in row.inner_text() and "STH-2026-5521" in row.inner_text()
    row.get_by_role("link").click()
    assert SCRIPT in page.locator(".note").inner_text()
    page = anna.upload(lab.police_order("lift", number, reason="wrongly_reported"), tmp_path,
                       path="", button="Lift our record")
    assert page.locator("[role=status] .status").inner_text() == "WHITELISTED"

    lab.sync("op-dk", "op-se", "op-dk")

    page = erik.go("/disputes")
    assert "lifted" in page.locator("tr", has_text=number[8:14]).inner_text()
    page.locator("tr", has_text=number[8:14]).get_by_role("link").click()
    assert "op-dk lifted its record" in page.locator(".lead").inner_text()
    assert erik.status(number) == "WHITELISTED"
    page = anna.go("/disputes")
    assert "lifted" in page.locator("tr", has_text=number[8:14]).inner_text()
    anna.close()
    erik.close()


def test_a_dispute_upheld_with_a_reason_reaches_the_filer_and_the_block_stays(
        browser: Any, lab: ConsoleLab, dialogs: list[str]) -> None:
    anna, erik = person(browser, lab, "dk", dialogs), person(browser, lab, "se", dialogs)
    number = imei(505)
    anna.block(number)
    lab.sync("op-dk", "op-se")
    _file_dispute(erik, number, "The owner says it was never stolen.")
    lab.sync("op-se", "op-dk")
    page = anna.go("/disputes")
    page.locator("tr", has_text=number[8:14]).get_by_role("link").click()
    page.get_by_role("button", name="Uphold the block").click()  # no reason: said plainly
    assert "Say why the block stands" in page.locator("#reason-error").inner_text()
    page.get_by_label("Reason for op-se").fill("Police confirm the theft (CPH-2026-118).")
    page.get_by_role("button", name="Uphold the block").click()
    assert "upheld" in page.locator(".lead").inner_text()

    lab.sync("op-se")

    page = erik.go("/disputes")
    page.locator("tr", has_text=number[8:14]).get_by_role("link").click()
    assert "Police confirm the theft" in page.content()
    assert erik.status(number) == "BLACKLISTED"
    anna.close()
    erik.close()


# -- refusals ------------------------------------------------------------------------------------


def test_a_form_posted_from_elsewhere_without_the_csrf_token_is_refused(
        browser: Any, lab: ConsoleLab, dialogs: list[str]) -> None:
    anna = person(browser, lab, "dk", dialogs)
    number = imei(506)
    server = lab.consoles["op-dk"]
    anna.page.set_content(
        f'<form method="post" action="{server.url}/block">'
        f'<input name="imei" value="{number}"><input name="case_ref" value="C">'
        '<input name="police_unit" value="U"><input name="reason" value="stolen">'
        '<button>Send</button></form>')
    with anna.page.expect_navigation():
        anna.page.get_by_role("button", name="Send").click()
    assert "This form could not be accepted" in anna.page.content()
    assert anna.status(number) != "BLACKLISTED"
    anna.close()


def test_an_auditor_reads_case_details_but_gets_no_forms(
        browser: Any, lab: ConsoleLab, dialogs: list[str]) -> None:
    anna = person(browser, lab, "dk", dialogs)
    number = imei(507)
    anna.block(number, note="note for the file")
    ida = person(browser, lab, "dk-auditor", dialogs)
    assert ida.page.get_by_role("link", name="Submit a block").count() == 0
    page = ida.go(f"/lookup?imei={number}")
    assert "note for the file" in page.content()
    assert ida.go("/block").locator("h1").inner_text() == "Your role cannot do this"
    response = requests.get(f"{lab.consoles['op-dk'].url}/api/v1/devices/{number}",
                            headers={"Authorization": f"Bearer {lab.tokens['dk-auditor']}"},
                            timeout=5)
    assert response.json()["status"] == "BLACKLISTED"
    anna.close()
    ida.close()


# -- sightings ----------------------------------------------------------------------------------


def test_a_tracked_device_seen_shows_on_the_start_page_and_its_subscriber_is_disclosed_once(
        browser: Any, lab: ConsoleLab, dialogs: list[str], tmp_path: Path) -> None:
    from sqlalchemy import select

    from imeisync.store import models
    from support.sighting_rows import add_sighting

    anna = person(browser, lab, "dk", dialogs)
    number, imsi = imei(508), "238011234567890"
    anna.upload(lab.police_order("track", number, case_ref="CPH-TRACE-508"), tmp_path)
    app = lab.consoles["op-dk"].operator.app
    with app.db.read() as session:
        record = session.execute(select(models.Record.id).where(
            models.Record.imei_key == number[:14], models.Record.kind == "track")).scalar_one()
    add_sighting(app, record, imsi=imsi, node="amf-7.cph.example")

    page = anna.go("/")
    assert "1 new" in page.locator("#new-sightings").inner_text()
    page.get_by_role("link", name="See the sightings").click()
    row = page.locator("tr", has_text="CPH-TRACE-508")
    assert "amf-7.cph.example" in row.inner_text() and imsi not in page.content()
    row.get_by_role("link").click()
    page.get_by_role("button", name="Record the court order and show the subscriber").click()
    assert "court order reference" in page.locator("#court_order-error").inner_text()
    assert imsi not in page.content()
    page.get_by_label("Court order reference").fill("KBH-RET-2026-0508")
    page.get_by_label("Issuing court").fill("Copenhagen City Court " + SCRIPT)
    page.get_by_role("button", name="Record the court order and show the subscriber").click()
    assert page.locator("#imsi").inner_text() == imsi
    assert SCRIPT in page.locator("#disclosed").inner_text()  # shown as text
    page.get_by_role("link", name="All sightings").click()
    page.locator("tr", has_text="CPH-TRACE-508").get_by_role("link").click()
    assert imsi not in page.content()  # shown once
    assert "to anna on court order KBH-RET-2026-0508" in page.content()
    anna.close()
