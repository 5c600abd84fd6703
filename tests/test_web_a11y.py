"""The pages issue 13 added or changed, checked with axe-core (pinned by deploy/install-deps.sh)
in the real Chromium, and on a 390 px phone screen: the login page and its throttled answer,
the message page with its "Show remote content" button, and compose answering 400 (a
character a header cannot carry) and 429 (the send limit)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import ROOT
from tests.test_web_browser import ARGS, CHROMIUM, DESKTOP, PHONE, log_in, smtp_send
from tests.webutil import served

pytestmark = [pytest.mark.browser, pytest.mark.slow]

AXE = ROOT / ".tools" / "axe" / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture
def webmail(settings, receiver) -> Iterator[str]:
    """gunicorn as `fallback up` runs it, with limits low enough to reach in a test."""
    with served(settings, login_source_failures=1, login_account_failures=50, send_limit_per_hour=1) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Any) -> Iterator[Any]:
    """Chromium as in tests/test_web_browser.py, letting axe's script past the pages' CSP."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport=DESKTOP, bypass_csp=True)
        yield context
        context.close()


def violations(page: Any) -> list[str]:
    if not AXE.exists():
        pytest.fail(f"{AXE} missing: run `make test` (deploy/install-deps.sh test installs axe-core)")
    page.add_script_tag(path=str(AXE))
    found = page.evaluate("async () => (await axe.run(document)).violations"
                          ".map(v => v.id + ': ' + v.help + ' (' + v.nodes.length + ')')")
    return list(found)


def check(page: Any, what: str) -> None:
    """No axe-core violation, and nothing wider than a phone's screen."""
    assert violations(page) == [], what
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], what
    page.set_viewport_size(DESKTOP)


def test_changed_pages_pass_axe_and_fit_a_phone(webmail, receiver, browser, r) -> None:
    base = webmail
    html = ('<p>Status</p><p><img src="https://images.remote.test/banner.png" alt="banner"></p>')
    smtp_send(receiver.port, [("alice@example.com", (
        "From: IT Desk <it@remote.test>\r\nTo: alice@example.com\r\nSubject: Remote banner\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n").encode())])
    page = browser.new_page()

    # The login page, then its throttled answer (429) after a wrong password.
    page.goto(f"{base}/login")
    check(page, "login page")
    # The delay after a failure starts at 1 s and doubles: on a slow machine the second try
    # may come after it, so try until the throttle answers (bounded).
    for _ in range(8):
        page.fill("input[name=username]", "alice@example.com")
        page.fill("input[name=password]", "wrong")
        page.locator("form button[type=submit]").first.click()
        page.wait_for_load_state()
        if page.get_by_text("Too many attempts").count():
            break
    assert page.get_by_text("Too many attempts").count() == 1
    check(page, "throttled login page")
    r.delete(*r.keys("throttle:*"))  # this client's and the account's counters: a clean start

    log_in(page, base, "alice@example.com")
    page.get_by_role("link", name="Remote banner").click()
    page.wait_for_load_state("networkidle")
    assert page.get_by_role("button", name="Show remote content").count() == 1
    check(page, "message page with the remote-content button")

    # Compose: a subject with U+2028 (400), then the send limit of 1 an hour (429).
    page.goto(f"{base}/compose")
    page.fill("input[name=to]", "bob@example.com")
    page.fill("input[name=subject]", "two\u2028lines")
    page.fill("textarea[name=body]", "hello")
    page.get_by_role("button", name="Send").click()
    page.wait_for_load_state()
    assert page.get_by_text("cannot be sent").count() >= 1
    check(page, "compose answering 400")
    page.fill("input[name=subject]", "one line")
    page.get_by_role("button", name="Send").click()
    page.wait_for_load_state()
    page.goto(f"{base}/compose")
    page.fill("input[name=to]", "bob@example.com")
    page.fill("input[name=subject]", "again")
    page.fill("textarea[name=body]", "hello")
    page.get_by_role("button", name="Send").click()
    page.wait_for_load_state()
    assert page.get_by_text("You can send again").count() >= 1
    check(page, "compose answering 429")
