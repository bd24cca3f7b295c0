#!/usr/bin/env python3
"""Screenshots of the web console's main pages, for the README: ``docs/screenshots/*.png``.

Runs the real thing on loopback — a reference registry, two operators (op-dk in Denmark, op-se
in Sweden) each serving its console — and walks through a report in headless Chromium: sign
in, block a stolen phone at op-dk, see it BLACKLISTED at op-se, op-se disputes the block, op-dk
lifts it with the police's signed order, op-se sees the answer.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (test extras).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.console_lab import ConsoleLab, browser_missing, launch  # noqa: E402

IMEI = "35-209900-176148-1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    missing = browser_missing()
    if missing:
        sys.exit(f"screenshots: {missing}")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imeisync-shots-") as tmp, \
            ConsoleLab(Path(tmp), [("op-dk", "DK"), ("op-se", "SE")]) as lab, \
            sync_playwright() as playwright:
        dk, se = lab.console("op-dk"), lab.console("op-se")
        dk_token, se_token = dk.token("anna.jensen"), se.token("erik.berg")
        browser = launch(playwright)

        def shot(page, name: str) -> None:
            page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
            print(f"  {args.out / name}.png")

        def sign_in(context, server, token):
            page = context.new_page()
            page.goto(server.url + "/")
            page.get_by_label("Your token").fill(token)
            page.get_by_role("button", name="Sign in").click()
            return page

        size = {"width": 1100, "height": 800}
        anna = browser.new_context(viewport=size)
        page = anna.new_page()
        page.goto(dk.url + "/signin")
        page.get_by_label("Your token").fill(dk_token)
        shot(page, "01-sign-in")
        page.get_by_role("button", name="Sign in").click()
        shot(page, "02-start")

        page.get_by_role("link", name="Submit a block").first.click()
        page.get_by_label("IMEI").fill("35-209900-176148-7")
        page.get_by_role("button", name="Block this device").click()
        shot(page, "03-block-form-errors")
        page.get_by_label("IMEI").fill(IMEI)
        page.get_by_label("Police case reference").fill("CPH-2026-118")
        page.get_by_label("Police unit").fill("Copenhagen Police, Station City")
        page.get_by_label("Stolen").check()
        page.get_by_label("Note for colleagues").fill("Taken from a bag on the metro, Nørreport.")
        page.get_by_role("button", name="Block this device").click()
        shot(page, "04-order-accepted")

        lab.sync("op-dk", "op-se")
        erik = browser.new_context(viewport=size)
        se_page = sign_in(erik, se, se_token)
        se_page.goto(se.url + "/lookup?imei=" + IMEI)
        shot(se_page, "05-device-blocked-by-another-operator")
        se_page.get_by_role("link", name="File a dispute").click()
        se_page.get_by_label("Your police case reference").fill("STH-2026-5521")
        se_page.get_by_label("Why the block is wrong").fill(
            "The phone was bought new in Stockholm in March (receipt seen by police); the IMEI "
            "in the Danish report was mistyped by one digit.")
        shot(se_page, "06-file-dispute")
        se_page.get_by_role("button", name="File the dispute").click()

        lab.sync("op-se", "op-dk")
        page.goto(dk.url + "/disputes")
        shot(page, "07-disputes-inbox")
        page.get_by_role("link", name="Review and answer").first.click()
        shot(page, "08-answer-dispute")
        page.get_by_label("Or paste the signed order").first.fill(
            lab.police_order("lift", IMEI, reason="wrongly_reported"))
        page.get_by_role("button", name="Lift our record").click()
        lab.sync("op-dk", "op-se", "op-dk")
        page.goto(page.url.split("?")[0])  # the order's page, as found later from "Orders"
        shot(page, "09-order-progress")

        se_page.goto(se.url + "/disputes")
        se_page.get_by_role("link", name="35-209900-176148-1").first.click()
        shot(se_page, "10-dispute-answered")
        page.goto(dk.url + "/orders")
        shot(page, "11-my-orders")
        browser.close()


if __name__ == "__main__":
    main()
