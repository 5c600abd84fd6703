"""The server-side sanitiser and MIME display, on the hostile corpus and on odd messages."""

from __future__ import annotations

import re

import pytest

from tests.hostile import as_mail, bodies
from web import render

LISTENER = "http://127.0.0.1:9"


@pytest.mark.parametrize("n", range(len(bodies(LISTENER))))
def test_hostile_html_is_neutralised(n: int) -> None:
    shown = render.render(as_mail(n, bodies(LISTENER)[n]))
    html = shown.html or ""
    low = html.lower()
    for bad in ("<script", "<svg", "<math", "<style", "<link", "<meta", "<base", "<form", "<input",
                "<button", "<iframe", "<object", "<embed", "<video", "<audio", "<source", "<template",
                "srcset", "background=", "javascript:", "data:text", "url(", "@import", "formaction"):
        assert bad not in low, (n, bad, html)
    assert not re.search(r"\son\w+\s*=", low), html  # no event handler attribute survives
    assert "127.0.0.1:9" not in html  # remote content dropped while blocked


def test_remote_images_only_when_asked() -> None:
    raw = as_mail(0, '<img src="https://img.test/a.png" alt="a"><img src="/local/path.png">')
    blocked = render.render(raw)
    assert blocked.has_remote and "img.test" not in blocked.html
    shown = render.render(raw, remote=True)
    assert 'src="https://img.test/a.png"' in shown.html
    assert "/local/path.png" not in shown.html  # relative URLs would hit the webmail itself


def test_links_open_outside_the_frame() -> None:
    html, _ = render.sanitize('<a href="https://example.org/x">x</a>')
    assert 'target="_blank"' in html and 'rel="noopener noreferrer"' in html


def test_plain_and_html_alternatives() -> None:
    raw = (b"Subject: alt\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n"
           b"--b\r\nContent-Type: text/html\r\n\r\n<p>caf&eacute;</p>\r\n--b--\r\n")
    shown = render.render(raw)
    assert shown.text.strip() == "café" and "<p>café</p>" in shown.html
    assert render.body_text(raw).strip() == "café"


def test_html_only_quoted_as_text() -> None:
    raw = as_mail(1, "<p>Hello <b>there</b></p><script>x()</script>")
    assert render.body_text(raw).strip() == "Hello there"


def test_attachment_names_and_sizes() -> None:
    from tests.test_web_mailbox import MIXED

    shown = render.render(MIXED)
    expected = [("page.html", len(b"<script>alert(1)</script>"))]
    assert [(a.filename, a.size) for a in shown.attachments] == expected
