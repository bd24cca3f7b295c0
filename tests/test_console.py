"""The web console over HTTP (in-process): sign-in and sessions, CSRF on every form, roles, plain
error messages tied to their fields, labels on every control, and script in every text field
shown as text on every page. The same flows in a real browser: test_console_browser.py."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest
from sqlalchemy import func, select

from imeisync.bootstrap import App
from imeisync.entrypoints.console import COOKIE
from imeisync.entrypoints.http_auth import failure_limiter
from imeisync.services.orders import Actor
from imeisync.store import models
from support.fixtures_api import Api, csrf_of, imei, make_api, seed_dispute, seed_foreign_record

PAGES = ["/", "/block", "/upload", "/lookup", "/orders", "/orders?all=1", "/disputes",
         "/disputes/new", "/notices"]
POSTS = ["/block", "/upload", "/disputes/new", "/disputes/op-se:1/uphold",
         "/disputes/op-se:1/lift", "/signout", "/signin", "/notices"]


def records(app: App) -> int:
    with app.db.read() as session:
        return session.execute(select(func.count()).select_from(models.Record)).scalar_one()


# -- signing in and out ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*PAGES, "/orders/X-1", "/disputes/op-se:1"])
def test_a_signed_out_visitor_is_sent_to_sign_in_and_back(api: Api, path: str) -> None:
    response = api.client.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/signin?next=")
    page = api.client.get(response.headers["location"])
    assert "Sign in" in page.text and 'name="next"' in page.text


def test_sign_in_sets_a_strict_httponly_session_and_sign_out_ends_it(api: Api) -> None:
    page = api.client.get("/signin")
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    answer = api.client.post("/signin", follow_redirects=False, data={
        "csrf": csrf_of(page.text), "token": api.tokens["liaison"], "next": "/orders"})
    assert answer.status_code == 303 and answer.headers["location"] == "/orders"
    assert api.tokens["liaison"] not in answer.headers["set-cookie"]
    home = api.client.get("/")
    assert "Signed in as" in home.text and "liaison-1" in home.text
    assert api.client.post("/signout", data={"csrf": csrf_of(home.text)},
                           follow_redirects=False).headers["location"] == "/signin?signed_out=1"
    assert api.client.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil",
                                    "/\t/evil.example", "javascript:alert(1)", ""])
def test_sign_in_goes_back_only_to_a_page_of_this_console(api: Api, target: str) -> None:
    page = api.client.get("/signin")
    answer = api.client.post("/signin", follow_redirects=False, data={
        "csrf": csrf_of(page.text), "token": api.tokens["liaison"], "next": target})
    assert answer.headers["location"] == "/"


def test_the_session_cookie_is_secure_over_tls(app: App) -> None:
    api = make_api(app, base_url="https://testserver")
    assert "Secure" in api.client.get("/signin").headers["set-cookie"]


def test_a_session_survives_only_while_its_token_does(api: Api) -> None:
    api.sign_in()
    assert api.client.get("/orders", follow_redirects=False).status_code == 200
    api.app.tokens.revoke("liaison-1")
    assert api.client.get("/orders", follow_redirects=False).status_code == 303


def test_a_tampered_session_cookie_is_a_signed_out_visitor(api: Api) -> None:
    api.sign_in()
    value = api.client.cookies[COOKIE]
    payload, mac = value.split(".")
    api.client.cookies.set(COOKIE, payload[:-2] + "xx." + mac)
    assert api.client.get("/orders", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(("role", "status", "words"), [
    ("network", 403, "cannot sign in to the console"),
    ("admin", 403, "cannot sign in to the console"),
    (None, 401, "was not recognised"),
])
def test_sign_in_refusals_say_what_to_do(api: Api, role: str | None, status: int,
                                         words: str) -> None:
    page = api.client.get("/signin")
    token = api.tokens[role] if role else "isk_not-a-token"
    answer = api.client.post("/signin", data={"csrf": csrf_of(page.text), "token": token})
    assert answer.status_code == status and words in answer.text
    assert 'aria-invalid="true"' in answer.text and 'href="#token"' in answer.text


def test_sign_in_is_braked_after_repeated_failures(app: App) -> None:
    api = make_api(app, limiter=failure_limiter(3, 300))
    csrf = csrf_of(api.client.get("/signin").text)
    for _ in range(3):
        api.client.post("/signin", data={"csrf": csrf, "token": "isk_wrong"})
    answer = api.client.post("/signin", data={"csrf": csrf, "token": api.tokens["liaison"]})
    assert answer.status_code == 429 and "Too many failed sign-ins" in answer.text


# -- CSRF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("csrf", ["missing", "wrong"])
def test_a_form_post_without_the_sessions_csrf_token_is_refused(
        api: Api, path: str, csrf: str) -> None:
    api.sign_in()
    data = {"imei": imei(1), "case_ref": "C", "police_unit": "U", "reason": "stolen",
            "token": api.tokens["liaison"]}
    if csrf == "wrong":
        data["csrf"] = "x" * 32
    answer = api.client.post(path, data=data, follow_redirects=False)
    assert answer.status_code == 403
    assert "could not be accepted" in answer.text and "reload the page" in answer.text
    assert records(api.app) == 0


def test_a_post_that_is_not_a_form_is_refused(api: Api) -> None:
    csrf = api.sign_in()
    answer = api.client.post("/block", content=f'{{"csrf": "{csrf}"}}',
                             headers={"content-type": "application/json"})
    assert answer.status_code == 400 and records(api.app) == 0


def test_an_oversized_form_is_refused_in_plain_words(api: Api) -> None:
    csrf = api.sign_in()
    answer = api.client.post("/upload", data={"csrf": csrf},
                             files={"order_file": ("o.jws", b"a" * 200_000)})
    assert answer.status_code == 413 and "too large" in answer.text


# -- roles ---------------------------------------------------------------------------------------


def test_an_auditor_reads_but_sees_no_forms_and_cannot_post(api: Api) -> None:
    api.app.intake().submit_unsigned({"imei": imei(2), "case_ref": "C", "police_unit": "U",
                                      "reason": "stolen", "note": "for auditors"},
                                     Actor("anna"))
    csrf = api.sign_in("auditor")
    home = api.client.get("/")
    assert 'href="/block"' not in home.text and 'href="/lookup"' in home.text
    assert api.client.get("/block").status_code == 403
    assert "for auditors" in api.client.get(f"/lookup?imei={imei(2)}").text
    answer = api.client.post("/block", data={"csrf": csrf, "imei": imei(3), "case_ref": "C",
                                             "police_unit": "U", "reason": "stolen"})
    assert answer.status_code == 403 and "auditor" in answer.text
    assert records(api.app) == 1


# -- forms: plain errors tied to fields, labels -------------------------------------------------


def test_block_form_errors_name_each_field_and_are_tied_to_it(api: Api) -> None:
    csrf = api.sign_in()
    answer = api.client.post("/block", data={"csrf": csrf, "imei": "35209900176148-7",
                                             "case_ref": "", "police_unit": "", "reason": ""})
    html = answer.text
    assert answer.status_code == 400 and "There is a problem" in html
    for name in ("imei", "case_ref", "police_unit", "reason"):
        assert f'href="#{name}"' in html
        assert f'id="{name}-error"' in html
    assert 'aria-describedby="imei-hint imei-error" aria-invalid="true"' in html
    assert "check digit is 7, expected 1" in html
    assert 'value="35209900176148-7"' in html  # what was typed is kept
    assert records(api.app) == 0


class _Controls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.controls: list[str] = []
        self.labels: set[str] = set()
        self.headings = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("input", "textarea", "select") and a.get("type") not in ("hidden", "submit"):
            self.controls.append(a.get("id") or "(no id)")
        if tag == "label" and a.get("for"):
            self.labels.add(a["for"] or "")
        if tag == "h1":
            self.headings += 1


def test_every_control_on_every_page_has_a_label_and_every_page_one_h1(api: Api) -> None:
    seed_foreign_record(api.app, imei(4)[:14])
    seed_dispute(api.app, "op-se:1", imei(5)[:14])
    api.app.intake().submit_unsigned({"imei": imei(5), "case_ref": "C", "police_unit": "U",
                                      "reason": "stolen"}, Actor("x"))
    api.sign_in()
    for path in [*PAGES, f"/lookup?imei={imei(4)}", f"/disputes/new?imei={imei(4)}",
                 "/disputes/op-se:1"]:
        page = api.client.get(path)
        assert page.status_code == 200, path
        parser = _Controls()
        parser.feed(page.text)
        assert parser.headings == 1, path
        unlabelled = [c for c in parser.controls if c not in parser.labels]
        assert not unlabelled, (path, unlabelled)
        assert page.headers["cache-control"] == "no-store"
        assert "default-src 'none'" in page.headers["content-security-policy"]


def test_unknown_console_pages_answer_in_plain_words(api: Api) -> None:
    api.sign_in()
    page = api.client.get("/nothing-here")
    assert page.status_code == 404 and "Page not found" in page.text
    missing = api.client.get("/orders/NO-SUCH-ORDER")
    assert missing.status_code == 404 and "no order NO-SUCH-ORDER" in missing.text


# -- script in every text field, on every page ----------------------------------------------------

SCRIPT = '<script>alert("x")</script>'
BREAKOUT = '"><img src=x onerror=alert(1)>'


def test_script_in_every_text_field_is_shown_as_text_on_every_page(
        api: Api, police: Any) -> None:
    csrf = api.sign_in()
    evil = SCRIPT + BREAKOUT
    # our block, through the form: case, unit, note
    answer = api.client.post("/block", data={"csrf": csrf, "imei": imei(10), "case_ref":
                                             "C" + SCRIPT[:40], "police_unit": "U" + evil[:100],
                                             "reason": "stolen", "note": evil})
    assert answer.status_code == 200, answer.text
    order_url = str(answer.url).split("?")[0].replace("http://testserver", "")
    # a signed order with script in its texts
    signed = police.sign("block", imei(11), case_ref="S" + SCRIPT[:40], police_unit=evil[:100],
                         note=evil)
    api.client.post("/upload", data={"csrf": csrf, "order_text": signed})
    # disputes from and about other operators, with script wherever text goes
    seed_foreign_record(api.app, imei(12)[:14])
    seed_dispute(api.app, "op-se:evil", imei(10)[:14], case_ref="X" + SCRIPT[:40], reason=evil)
    seed_dispute(api.app, "op-se:evil2", imei(11)[:14], state="upheld", reason=evil,
                 answer_reason=evil, case_ref=SCRIPT[:60])
    seed_dispute(api.app, "op-dk:mine", imei(12)[:14], direction="filed", filer="op-dk",
                 owner="op-se", case_ref=SCRIPT[:60], reason=evil, filed_by="anna")
    # forms echoing what was typed, errors quoting it, the sign-in's next
    pages = [
        "/", "/orders", "/orders?all=1", order_url, f"/lookup?imei={imei(10)}",
        f"/lookup?imei={imei(11)}", f"/lookup?imei={imei(12)}", "/disputes",
        "/disputes/op-se:evil", "/disputes/op-se:evil2", "/disputes/op-dk:mine",
        f"/disputes/new?imei={imei(12)}", "/lookup?imei=" + SCRIPT, "/block?imei=" + evil,
        "/disputes/new?imei=" + evil,
    ]
    seen_escaped = 0
    for path in pages:
        page = api.client.get(path)
        assert page.status_code in (200, 400), (path, page.status_code)
        _assert_inert(page.text, path)
        seen_escaped += "&lt;script&gt;" in page.text
    assert seen_escaped >= 10
    for data in ({"csrf": csrf, "imei": evil, "case_ref": evil, "police_unit": evil,
                  "reason": evil, "note": evil},):
        _assert_inert(api.client.post("/block", data=data).text, "/block (errors)")
        _assert_inert(api.client.post("/disputes/new", data=data).text, "/disputes/new")
        _assert_inert(api.client.post("/upload", data={"csrf": csrf, "order_text": evil}).text,
                      "/upload (errors)")
        _assert_inert(api.client.post("/disputes/op-se:evil/uphold",
                                      data={"csrf": csrf, "reason": ""}).text, "uphold")
    api.client.post("/signout", data={"csrf": csrf})
    _assert_inert(api.client.get("/signin?next=" + evil).text, "/signin")


class _Elements(HTMLParser):
    """Every element and attribute name the browser would build from the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)


def _assert_inert(html: str, where: str) -> None:
    parsed = _Elements()
    parsed.feed(html)
    assert not parsed.tags & {"script", "img", "iframe"}, (where, parsed.tags)
    assert not [a for a in parsed.attributes if a.startswith("on")], where
    assert "<script" not in html.lower(), where
