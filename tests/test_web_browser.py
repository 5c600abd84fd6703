"""The webmail in a real headless Chromium (Debian's package), served by gunicorn as `fallback up` runs it.

Mail comes in through the real SMTP receiver.  Hostile HTML mails are opened
with a small HTTP listener on 127.0.0.2 standing in for a remote host: it
must not see a single request, and no script may run.  Screenshots of the
inbox and a message, desktop and phone, go to test-artifacts/.
"""

from __future__ import annotations

import http.server
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hostile import as_mail, bodies
from tests.servers import ROOT
from tests.webutil import served

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def webmail(settings, receiver) -> Iterator[str]:
    """gunicorn serving the webmail on a free port, started and stopped like `fallback up` does."""
    with served(settings) as url:
        yield url


class Listener:
    """A tiny HTTP server recording every request: the stand-in for a remote host."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def _hit(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()
                self.wfile.write(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")

            do_GET = do_POST = _hit

            def log_message(self, *args: Any) -> None:
                pass

        # Not the webmail's host (127.0.0.1): URLs naming that are dropped as the webmail's own.
        self.server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport=DESKTOP,
        )
        yield context
        context.close()


def smtp_send(port: int, raws: list[tuple[str, bytes]]) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        for rcpt, raw in raws:
            client.sendmail("sender@remote.test", [rcpt], raw)


def log_in(page: Any, base: str, user: str, password: str = "secret") -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.locator("form button[type=submit]").first.click()
    page.wait_for_url(f"{base}/")


def log_out(page: Any, base: str) -> None:
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{base}/login?out=1")


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_end_to_end_receive_read_reply_logout(webmail, receiver, browser, r) -> None:
    base = webmail
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    log_in(page, base, "alice@example.com")
    assert "No messages here yet." in page.content()

    smtp_send(receiver.port, [("alice@example.com", (
        b"From: Ann Remote <ann@remote.test>\r\nTo: alice@example.com\r\n"
        b"Subject: Outage plan\r\nDate: Mon, 23 Nov 2026 09:30:00 +0000\r\n"
        b"Message-ID: <plan@remote.test>\r\n\r\nCan we meet at 3?\r\nAnn\r\n"))])
    page.reload()
    link = page.get_by_role("link", name="Outage plan")
    assert "unread" in (page.locator("li", has=link).get_attribute("class") or "")
    link.click()
    assert "Can we meet at 3?" in page.locator("pre.body").inner_text()
    assert "Ann Remote <ann@remote.test>" in page.locator("dl.headers").inner_text()

    page.get_by_role("link", name="Reply", exact=True).click()
    assert page.input_value("input[name=subject]") == "Re: Outage plan"
    page.fill("input[name=to]", "bob@example.com")
    page.fill("textarea[name=body]", "Bob, can you join at 3?\n" + page.input_value("textarea[name=body]"))
    page.locator("form.compose button[type=submit]").first.click()
    page.wait_for_selector("text=Your message was sent.")
    log_out(page, base)
    page.goto(f"{base}/")
    assert page.url == f"{base}/login"

    log_in(page, base, "bob@example.com")
    page.get_by_role("link", name="Re: Outage plan").click()
    body = page.locator("pre.body").inner_text()
    assert "Bob, can you join at 3?" in body and "> Can we meet at 3?" in body
    assert "alice@example.com" in page.locator("dl.headers").inner_text()
    log_out(page, base)
    assert "You have logged out." in page.content()
    assert errors == []


def test_hostile_mails_run_no_script_and_load_nothing_remote(webmail, receiver, browser, r) -> None:
    base = webmail
    with Listener() as listener:
        mails = [("alice@example.com", as_mail(n, b)) for n, b in enumerate(bodies(listener.url))]
        smtp_send(receiver.port, mails)
        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        log_in(page, base, "alice@example.com")
        links = page.locator("ul.list a")
        hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
        assert len(hrefs) == len(mails)
        for href in hrefs:
            page.goto(f"{base}{href}")
            page.wait_for_load_state("networkidle")
            frame = page.frame_locator("iframe.body")
            # The frame rendered, so the test looked at real output.
            assert frame.locator("body").count() == 1
            # Clicking a javascript:/data: link does nothing either.
            for link in frame.locator("a").all():
                link.click(modifiers=[], timeout=2000, no_wait_after=True)
            page.wait_for_load_state("networkidle")
        assert dialogs == []
        assert listener.hits == [], listener.hits

        # Control: the listener does see requests when the user asks for remote content,
        # so the silence above is real.  Even then no script runs.
        page.goto(f"{base}/")
        last = page.get_by_role("link", name=f"hostile {len(mails) - 1}").get_attribute("href")
        page.goto(f"{base}{last}")
        page.get_by_role("button", name="Show remote content").click()
        page.wait_for_load_state("networkidle")
        assert "/r/plain-img" in listener.hits
        assert not [h for h in listener.hits if h.startswith("/s/")]
        assert dialogs == []


def test_screenshots_desktop_and_phone(webmail, receiver, browser, r) -> None:
    base = webmail
    html = ('<h2 style="color:#0b57d0">Status update</h2><p>The <b>main mail system</b> is being '
            'restored. <img src="cid:logo@x" alt="logo"></p><ul><li>Mail sent to you is kept</li>'
            '<li>You can reply from here</li></ul><p><img src="https://images.remote.test/banner.png"></p>')
    mails = [("alice@example.com", (
        f"From: Sender {n} <s{n}@remote.test>\r\nTo: alice@example.com\r\nSubject: Message number {n} "
        f"about the outage\r\nDate: Mon, 23 Nov 2026 09:{n:02d}:00 +0000\r\n\r\nText {n}\r\n").encode())
        for n in range(12)]
    mails.append(("alice@example.com", (
        "From: IT Desk <it@remote.test>\r\nTo: alice@example.com\r\nSubject: Status update\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        "--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"{html}\r\n--B\r\nContent-Type: image/gif\r\nContent-ID: <logo@x>\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nR0lGODlhAQABAIAAAAUEBAAAACwAAAAAAQABAAACAkQBADs=\r\n"
        "--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"plan.pdf\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n").encode()))
    smtp_send(receiver.port, mails)
    page = browser.new_page()
    log_in(page, base, "alice@example.com")
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)
        page.goto(f"{base}/")
        shot(page, f"webmail-inbox-{name}")
        page.get_by_role("link", name="Status update").click()
        page.wait_for_load_state("networkidle")
        assert page.get_by_text("Show remote content").count() == 1
        assert page.get_by_role("link", name="plan.pdf").count() == 1
        shot(page, f"webmail-message-{name}")
    # On a phone the list is not wider than the screen.
    page.goto(f"{base}/")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for name in ("inbox", "message"):
        for size in ("desktop", "phone"):
            assert (ARTIFACTS / f"webmail-{name}-{size}.png").stat().st_size > 1000
