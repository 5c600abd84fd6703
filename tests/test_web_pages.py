"""Every webmail page once, in one real headless Chromium: the canonical every-page check.

For each page (login, status, inbox, Sent, Drafts, Trash, messages plain and HTML, compose,
the error page), in light and in dark mode (prefers-color-scheme): no serious or critical
axe-core violation; nothing wider than a 390 px phone; on the phone every button is at least
44 px tall (one thumb); the first Tab lands on a visible "Skip to content" link; and
screenshots at phone and desktop size, light and dark, go to test-artifacts/
(`pages-<page>-<size>-<scheme>.jpeg`).  In dark mode the page is dark, a colourless mail's
frame is light text on a dark frame, and a mail with its own colours keeps them on white.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import ROOT
from tests.test_web_a11y import AXE
from tests.test_web_browser import ARGS, CHROMIUM, DESKTOP, PHONE, log_in, smtp_send
from tests.webutil import served

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"
ALICE = "alice@example.com"
SEVERE = ("serious", "critical")


@pytest.fixture
def webmail(settings: Any, receiver: Any) -> Iterator[str]:
    with served(settings) as url:
        yield url


def mail(subject: str, body: str, ctype: str = "text/plain", extra: str = "") -> bytes:
    return (f"From: IT Desk <it@remote.test>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n{extra}"
            f"Content-Type: {ctype}; charset=utf-8\r\n\r\n{body}\r\n").encode()


ATTACHED = (
    f"From: Ann Remote <ann@remote.test>\r\nTo: {ALICE}\r\nSubject: Plan with attachment\r\n"
    "Date: Sun, 22 Nov 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed; boundary=B\r\n\r\n"
    "--B\r\nContent-Type: text/plain\r\n\r\nThe plan is attached.\r\n"
    "--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"plan.pdf\"\r\n"
    "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n").encode()


def severe_violations(page: Any) -> list[str]:
    page.add_script_tag(path=str(AXE))
    found = page.evaluate(
        "async (severe) => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".filter(v => severe.includes(v.impact))"
        ".map(v => v.id + ': ' + v.help + ' ' + v.nodes.map(n => n.target.join(' ')).join(', '))",
        list(SEVERE))
    return list(found)


def luminance(rgb: list[int] | tuple[int, ...]) -> float:
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def css_rgb(value: str) -> tuple[int, ...]:
    inside = value[value.index("(") + 1:value.index(")")].replace(",", " ").split()
    return tuple(int(float(v)) for v in inside[:3])


class Pixels:
    """Reads pixels of a screenshot in a blank page of the same browser (no image library)."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()

    def at(self, png: bytes, x: int, y: int) -> list[int]:
        return list(self.page.evaluate(
            "async ([b64, x, y]) => { const img = new Image(); img.src = 'data:image/png;base64,' + b64;"
            " await img.decode(); const c = document.createElement('canvas'); c.width = img.width;"
            " c.height = img.height; const g = c.getContext('2d'); g.drawImage(img, 0, 0);"
            " return Array.from(g.getImageData(x, y, 1, 1).data); }",
            [base64.b64encode(png).decode(), x, y]))


def audit(page: Any, name: str) -> None:
    """axe in light and dark, the phone's width and thumbs, the skip link, four screenshots."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_load_state("load")
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert severe_violations(page) == [], f"{name} ({scheme})"
        body = css_rgb(page.evaluate("getComputedStyle(document.body).backgroundColor"))
        assert (luminance(body) < 0.05) if scheme == "dark" else (luminance(body) > 0.8), (name, scheme, body)
        for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.screenshot(path=str(ARTIFACTS / f"pages-{name}-{size}-{scheme}.jpeg"), full_page=True,
                            type="jpeg", quality=70)  # JPEG: half the time of PNG, for 48 shots
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
        small = page.evaluate(
            "() => [...document.querySelectorAll('button, .button, nav.folders a')]"
            ".filter(e => e.offsetParent && e.getBoundingClientRect().height < 44)"
            ".map(e => e.textContent.trim())")
        assert small == [], f"{name}: touch targets under 44 px on a phone: {small}"
        page.set_viewport_size(DESKTOP)
    page.emulate_media(color_scheme="light")
    # The skip link is the first focusable element (the first Tab lands on it, unless the
    # page focuses a field itself, as login does), visible once focused; it leads to <main>.
    first = page.evaluate(
        "() => { const f = [...document.querySelectorAll('a[href], button, input:not([type=hidden]), select,"
        " textarea, iframe, [tabindex]')].find(e => e.tabIndex >= 0); f.focus();"
        " return {text: f.textContent, top: f.getBoundingClientRect().top}; }")
    assert first["text"] == "Skip to content" and first["top"] >= 0, name
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main", name
    for size in ("desktop", "phone"):
        for scheme in ("light", "dark"):
            assert (ARTIFACTS / f"pages-{name}-{size}-{scheme}.jpeg").stat().st_size > 1000


def frame_colours(page: Any) -> dict[str, str]:
    frame = next(f for f in page.frames if f.url.endswith("/body"))
    return dict(frame.evaluate(
        "() => { const probe = document.createElement('div'); probe.style.background = 'Canvas';"
        " document.body.append(probe); const canvas = getComputedStyle(probe).backgroundColor;"
        " probe.remove();"
        " return {scheme: getComputedStyle(document.documentElement).colorScheme,"
        " text: getComputedStyle(document.querySelector('p, td') || document.body).color, canvas}; }"))


def test_every_page_light_dark_phone_desktop(webmail: str, receiver: Any, r: Any) -> None:
    from playwright.sync_api import sync_playwright

    base = webmail
    smtp_send(receiver.port, [
        (ALICE, ATTACHED),
        (ALICE, mail("Coloured newsletter", '<table bgcolor="#fff3e0"><tr><td style="color:#3e2723">'
                     "Our colours stay</td></tr></table>", "text/html")),
        (ALICE, mail("Plain HTML", "<p>No colours of its own: follows dark mode.</p>", "text/html")),
        (ALICE, mail("Outage plan", "Can we meet at 3?\r\n\r\nAnn")),
    ])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport=DESKTOP, bypass_csp=True)  # lets axe's script in
        page = context.new_page()
        pixels = Pixels(context)
        try:
            page.goto(f"{base}/login")
            audit(page, "login")
            page.goto(f"{base}/status")
            audit(page, "status")
            log_in(page, base, ALICE)

            page.get_by_role("link", name="Outage plan").click()
            page.get_by_role("button", name="Flag").click()
            page.wait_for_url(f"{base}/message/*")
            audit(page, "message-text")
            page.goto(f"{base}/")
            # Unread and flagged are said, not only shown.
            unread = page.locator("li", has=page.get_by_role("link", name="Plain HTML")).locator(".who")
            assert (unread.text_content() or "").startswith("Unread, ")
            flagged = page.locator("li", has=page.get_by_role("link", name="Outage plan")).locator(".who")
            flagged_text = flagged.text_content() or ""
            assert flagged_text.startswith("★Flagged, ") and "Unread" not in flagged_text
            audit(page, "inbox")

            page.get_by_role("link", name="Plain HTML").click()
            page.wait_for_load_state("load")
            audit(page, "message-html")
            page.emulate_media(color_scheme="dark")
            page.wait_for_timeout(100)  # the frame restyles after the media change
            colours = frame_colours(page)
            assert colours["scheme"] == "light dark"
            text = css_rgb(colours["text"])
            frame_png = page.locator("iframe.body").screenshot()
            backdrop = pixels.at(frame_png, 4, 4)
            assert luminance(backdrop) < 0.05 and contrast(text, backdrop) >= 7, (text, backdrop)
            page.emulate_media(color_scheme="light")

            page.goto(f"{base}/")
            page.get_by_role("link", name="Coloured newsletter").click()
            page.wait_for_load_state("load")
            page.emulate_media(color_scheme="dark")
            page.wait_for_timeout(100)
            colours = frame_colours(page)
            assert colours["scheme"] == "light" and css_rgb(colours["text"]) == (0x3e, 0x27, 0x23)
            backdrop = pixels.at(page.locator("iframe.body").screenshot(), 4, 4)
            assert luminance(backdrop) > 0.9, backdrop  # white, as the mail's colours expect
            audit(page, "message-coloured")

            page.goto(f"{base}/")
            page.get_by_role("link", name="Plan with attachment").click()
            page.get_by_role("button", name="Delete").click()
            page.goto(f"{base}/folder/trash")
            assert page.get_by_role("link", name="Plan with attachment").count() == 1
            audit(page, "trash")

            page.goto(f"{base}/compose")
            audit(page, "compose")
            page.fill("input[name=to]", "bob@example.com")
            page.fill("input[name=subject]", "Meeting at 3")
            page.fill("textarea[name=body]", "See you then.")
            page.get_by_role("button", name="Send").click()
            page.wait_for_url(f"{base}/message/*")
            audit(page, "message-sent")
            page.goto(f"{base}/folder/sent")
            assert page.get_by_role("link", name="Meeting at 3").count() == 1
            audit(page, "sent")
            if page.request.get(f"{base}/folder/drafts").status == 200:  # being added in issue 15 item 1
                page.goto(f"{base}/folder/drafts")
                audit(page, "drafts")
            page.goto(f"{base}/message/0123456789abcdef0123")
            assert page.get_by_role("heading", name="Not found").count() == 1
            audit(page, "error")
        finally:
            context.close()
            browser.close()
