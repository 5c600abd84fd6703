"""Drafts and undo send in the real Chromium (issue 15 items 1 and 7): compose saves by itself,
the draft survives a logout, reopens, is sent, undone, and is back in Drafts; axe-core and a
390 px screen on compose, Drafts and the Undo page; screenshots to test-artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fallback import keys
from fallback.mailbox import fields
from tests.test_web_a11y import check
from tests.test_web_browser import ARGS, ARTIFACTS, CHROMIUM, DESKTOP, PHONE, log_in, log_out
from tests.webutil import served

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ALICE = "alice@example.com"
WAIT_MS = 20_000  # every wait for the page is bounded


@pytest.fixture
def webmail(settings, mailboxes) -> Iterator[str]:
    with served(settings, undo_send_seconds=60) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Any) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport=DESKTOP, bypass_csp=True)  # CSP bypassed for axe's script only
        yield context
        context.close()


def shots(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def test_draft_autosave_logout_reopen_send_undo(webmail, browser, r) -> None:
    base = webmail
    page = browser.new_page()
    log_in(page, base, ALICE)
    page.goto(f"{base}/compose")
    check(page, "compose")
    page.fill("#to", "bob@example.com")
    page.fill("#subject", "Typed in the browser")
    page.fill("#body", "Words that must not be lost.")
    # compose.js saves within seconds of the last change, and says so politely.
    page.wait_for_function("document.getElementById('draft-status').textContent.includes('Draft saved')",
                           timeout=WAIT_MS)
    assert page.get_attribute("#draft-status", "aria-live") == "polite"
    (draft_id,) = [i.decode() for i in r.zrange(keys.folder(ALICE, fields.DRAFTS), 0, -1)]
    assert page.input_value("input[name=saved]") == draft_id
    shots(page, "compose")

    log_out(page, base)
    log_in(page, base, ALICE)
    page.goto(f"{base}/folder/drafts")
    check(page, "drafts folder")
    shots(page, "drafts")
    page.get_by_role("link", name="Typed in the browser").click()
    page.wait_for_url(f"{base}/compose?draft={draft_id}", timeout=WAIT_MS)
    assert page.input_value("#to") == "bob@example.com"
    assert page.input_value("#body") == "Words that must not be lost."

    page.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_url(f"{base}/sent/*", timeout=WAIT_MS)
    assert r.zcard(keys.folder(ALICE, fields.DRAFTS)) == 0
    check(page, "undo page")
    shots(page, "undo")
    page.get_by_role("button", name="Undo").click()
    page.wait_for_url(f"{base}/compose?draft=*", timeout=WAIT_MS)
    assert "Sending undone" in page.text_content("#draft-status")
    assert page.input_value("#subject") == "Typed in the browser"
    page.goto(f"{base}/folder/drafts")
    assert page.get_by_role("link", name="Typed in the browser").count() == 1
    assert r.zcard(keys.folder(ALICE, fields.SENT)) == 0
