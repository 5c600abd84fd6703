"""The admin console in the real Chromium against gunicorn: every page, axe-core clean and no
sideways scroll on a 390 px phone (tests/test_web_a11y.py's `check`), with screenshots in
test-artifacts/; logging in, a queue deletion through its confirmation page, the incident
text and logging out are done by clicking, as an operator would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fallback import ids
from fallback.config import Settings
from fallback.ops import failover, incident
from fallback.queues import forward, outbound
from tests.servers import ROOT
from tests.test_web_a11y import browser, check  # noqa: F401 - fixture
from tests.test_web_browser import smtp_send
from tests.webutil import served, simple

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ADMIN = "browser-console-token-0123456789abcdef"
SHOTS = ROOT / "test-artifacts"
BODY = b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: fwd\r\n\r\nhello\r\n"


@pytest.fixture
def console(settings: Settings, receiver: Any) -> Iterator[str]:
    with served(settings, admin_token=ADMIN) as url:
        yield url


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)


def test_every_console_page_in_chromium(console: str, receiver: Any, browser: Any,  # noqa: F811
                                        r: redis.Redis) -> None:
    base = console
    failover.start(r, ["default"])
    smtp_send(receiver.port, [("alice@example.com", simple("hello", to="alice@example.com"))])
    out_id = ids.new_id()
    outbound.submit(r, sender="alice@example.com", mailstore="default", recipients=["x@example.org"],
                    raw=BODY, msg_id=out_id)
    fwd_id = ids.new_id()
    forward.enqueue(r, ["carol@example.org"], fwd_id, BODY, "someone@example.org")
    page = browser.new_page()

    page.goto(f"{base}/admin/login")
    check(page, "console login")
    shot(page, "login")
    page.fill("input[name=token]", "wrong")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text().startswith("Wrong token.")
    check(page, "console login, wrong token")
    page.fill("input[name=token]", ADMIN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/admin/")

    walk = [("dashboard", "/admin/"), ("affected", "/admin/affected"),
            ("affected-search", "/admin/affected?q=ali"), ("outbound", "/admin/queues/outbound"),
            ("outbound-show", f"/admin/queues/outbound/{out_id}"), ("forward", "/admin/queues/forward"),
            ("forward-show", f"/admin/queues/forward/{fwd_id}"),
            ("trace", "/admin/trace?address=alice@example.com"), ("audit", "/admin/audit"),
            ("incident", "/admin/incident")]
    for name, path in walk:
        page.goto(base + path)
        assert page.locator("h1").count() == 1, name
        check(page, name)
        shot(page, name)
    page.goto(f"{base}/admin/affected")
    page.fill("input[name=q]", "alice@example.com")
    page.get_by_role("button", name="Search").click()
    assert "alice@example.com" in page.locator("table").inner_text()  # the name index answers

    # Delete the forward message through its confirmation page.
    page.goto(f"{base}/admin/queues/forward/{fwd_id}")
    page.get_by_role("link", name="Delete…").click()
    check(page, "delete confirmation")
    shot(page, "confirm-delete")
    page.get_by_role("button", name="Yes, delete it").click()
    page.wait_for_url(f"{base}/admin/queues/forward?deleted={fwd_id}")
    assert "Deleted" in page.get_by_role("status").inner_text()

    # The incident text: a refused one keeps what was typed, then a good one is set.
    page.goto(f"{base}/admin/incident")
    page.fill("textarea[name=text]", "x" * (incident.MAX_LENGTH + 1))
    page.get_by_role("button", name="Set the incident text").click()
    assert "at most" in page.get_by_role("alert").inner_text()
    check(page, "incident refused")
    page.fill("textarea[name=text]", "Mail to the main system is delayed.")
    page.get_by_role("button", name="Set the incident text").click()
    page.wait_for_url(f"{base}/admin/incident?done=set")
    assert incident.read(r) is not None

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{base}/admin/login?out=1")
    page.goto(f"{base}/admin/")
    assert page.url == f"{base}/admin/login"
