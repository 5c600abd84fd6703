"""Keyboard shortcuts (web/static/keys.js) in a real headless Chromium, under the pages' real CSP.

One walk: j/k move a visible selection over the message rows, o and Enter open, / focuses
the search field, ? opens the list of shortcuts (Escape closes it), r/a/f go to reply,
reply all and forward, # deletes (from the message page and from the list, through the
delete form's POST with the CSRF token), c composes.  Typing those letters in a field, or
pressing them with Ctrl, does nothing but type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fallback import keys
from fallback.mailbox import fields, store
from tests.test_web_browser import ARGS, CHROMIUM, DESKTOP, log_in, smtp_send
from tests.webutil import served, simple

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ALICE = "alice@example.com"


@pytest.fixture
def webmail(settings, receiver) -> Iterator[str]:
    with served(settings) as url:
        yield url


def active_row(page: Any) -> str:
    """The subject of the row the focus is in ('' outside the list)."""
    return str(page.evaluate(
        "() => { const li = document.activeElement.closest('[data-row]');"
        " return li ? li.querySelector('.subject').textContent : ''; }"))


def selected(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("li.selected .subject").all_inner_texts()]


def inbox_subjects(r: Any) -> set[str]:
    ids = [i.decode() for i in r.zrange(keys.folder(ALICE, fields.INBOX), 0, -1)]
    return {(store.MailboxReader(r, ALICE).meta(i) or {}).get(fields.SUBJECT, "") for i in ids}


def test_keyboard_walk(webmail, receiver, r) -> None:
    from playwright.sync_api import sync_playwright

    base = webmail
    for n in (1, 2, 3, 4):  # one at a time: the list shows them newest first, 4 at the top
        smtp_send(receiver.port, [(ALICE, simple(f"note {n}"))])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport=DESKTOP)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if "Refused" in m.text else None)
        try:
            log_in(page, base, ALICE)
            assert page.locator("[data-row]").count() == 4

            # j/k: a visible selection, and the focus with it (a visible outline).
            page.keyboard.press("j")
            assert selected(page) == ["note 4"] and active_row(page) == "note 4"
            page.keyboard.press("j")
            page.keyboard.press("j")
            assert selected(page) == ["note 2"] and active_row(page) == "note 2"
            page.keyboard.press("k")
            assert selected(page) == ["note 3"] and active_row(page) == "note 3"
            outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
            assert outline != "none"
            for _ in range(6):  # past the last row: stays on it
                page.keyboard.press("j")
            assert selected(page) == ["note 1"]

            # Ctrl+c copies, it does not compose.
            page.keyboard.press("Control+c")
            assert page.url == f"{base}/"

            # /: the search field; typing c, j and # there only types.
            page.keyboard.press("/")
            assert page.evaluate("document.activeElement.name") == "q"
            page.keyboard.type("cj#")
            assert page.url == f"{base}/" and page.input_value("input[name=q]") == "cj#"
            assert selected(page) == ["note 1"]
            page.evaluate("document.activeElement.blur()")

            # ?: the list of shortcuts, a modal dialog; Escape closes it.
            page.keyboard.press("?")
            dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
            assert dialog.is_visible() and "Reply all" in dialog.inner_text()
            page.keyboard.press("j")  # keys do nothing behind the dialog
            assert selected(page) == ["note 1"]
            page.keyboard.press("Escape")
            assert not dialog.is_visible()

            # o opens the selected row; Enter opens the focused one.
            page.keyboard.press("k")
            page.keyboard.press("o")
            page.wait_for_url(f"{base}/message/*")
            assert page.locator("h1").inner_text() == "note 2"
            page.go_back()
            page.keyboard.press("j")
            page.keyboard.press("Enter")
            page.wait_for_url(f"{base}/message/*")
            assert page.locator("h1").inner_text() == "note 4"
            message_url = page.url

            # r, a, f: reply, reply all, forward; typing in the form stays in the form.
            page.keyboard.press("r")
            page.wait_for_url(f"{base}/compose?*")
            assert page.input_value("input[name=subject]") == "Re: note 4"
            page.focus("textarea[name=body]")
            page.keyboard.type("c r a f # ?")
            assert page.url.startswith(f"{base}/compose?") and "c r a f # ?" in page.input_value("textarea")
            assert not page.get_by_role("dialog").is_visible()
            page.goto(message_url)
            page.keyboard.press("a")
            page.wait_for_url("**all=1*")
            page.goto(message_url)
            page.keyboard.press("f")
            page.wait_for_url("**forward=*")
            assert page.input_value("input[name=subject]") == "Fwd: note 4"

            # # on the message page: its Delete form (POST with the CSRF token).
            page.goto(message_url)
            page.keyboard.press("#")
            page.wait_for_url(f"{base}/")
            assert inbox_subjects(r) == {"note 1", "note 2", "note 3"}

            # # in the list: the selected row, through the same delete POST.
            page.keyboard.press("j")
            page.keyboard.press("j")
            assert selected(page) == ["note 2"]
            page.keyboard.press("#")
            page.wait_for_load_state()
            page.locator("[data-row]").nth(1).wait_for()
            assert inbox_subjects(r) == {"note 1", "note 3"}
            assert page.locator("[data-row]").count() == 2
            trash = [i.decode() for i in r.zrange(keys.folder(ALICE, fields.TRASH), 0, -1)]
            assert len(trash) == 2

            # c: compose.
            page.keyboard.press("c")
            page.wait_for_url(f"{base}/compose")
            assert errors == [], errors
        finally:
            context.close()
            browser.close()
