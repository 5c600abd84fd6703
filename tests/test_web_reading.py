"""Reading cannot leak: no URL in a mail leads back into the webmail, and remote content loads
only after the user's own POST on the message page (test client on the real Redis, and a real
Chromium against gunicorn)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest

from fallback import keys
from fallback.ids import new_id
from fallback.mailbox import fields, store
from tests.hostile import as_mail
from tests.test_web_browser import Listener, browser, log_in, smtp_send, webmail  # noqa: F401
from tests.webutil import csrf, log_in_as, make_app, put_message

ALICE, BOB = "alice@example.com", "bob@example.com"
WEBMAIL_URL = "https://webmail.example.org/"

# Every way a mail could name the webmail: relative, protocol-relative, the webmail's own host
# (as this request reached it, "localhost", and as users are told to type it), in disguise.
SNEAKY = """
<a id="q" href="?remote=1">show images</a>
<a id="c" href="/compose?to=mallory@remote.test&amp;subject=hi">compose</a>
<a id="f" href="/message/01ABCDEFGHJKMNPQRSTVWXYZ00/frame?remote=1">frame</a>
<a id="rel" href="logout">relative</a>
<a id="frag" href="#top">fragment</a>
<a id="pr" href="//evil.example/x">protocol relative</a>
<a id="bs" href="\\\\evil.example/x">backslashes</a>
<a id="own" href="http://localhost/compose">own host</a>
<a id="ownport" href="https://LOCALHOST:8443/compose">own host, other port</a>
<a id="pub" href="https://webmail.example.org/?remote=1">public name</a>
<a id="pct" href="https://%77ebmail.example.org/">percent-encoded</a>
<a id="tab" href="ht&#9;tps://webmail.example.org/">tab inside</a>
<a id="nos" href="http:compose">no slashes</a>
<img id="i1" src="/logout"><img id="i2" src="?remote=1"><img id="i3" src="//evil.example/t.gif">
<img id="i4" src="http://localhost/message/x/remote">
<form action=""><input name="a"><button formaction="/logout">go</button></form>
<form action="/message/01ABCDEFGHJKMNPQRSTVWXYZ00/remote" method="post"><button>x</button></form>
<base href="/"><meta http-equiv="refresh" content="0;url=/logout">
<img srcset="/logout 1x, https://evil.example/s.gif 2x">
<div style="background:url(/logout); color: red">css</div>
<p style="width: url(/compose)">css in an allowed property</p>
<a id="ok" href="https://outside.example/page?x=1">outside</a>
<a id="mail" href="mailto:ann@remote.test">write to Ann</a>
<img id="remote" src="https://tracker.example/pixel.gif">
"""

URL_ATTR = re.compile(r"""\b(href|src|action|formaction|srcset|content|background)\s*=\s*["']?([^"'\s>]*)""",
                      re.I)


def frame_of(client: Any, msg_id: str) -> Any:
    response = client.get(f"/message/{msg_id}/body")
    assert response.status_code == 200
    return response


def urls_in(html: str) -> list[str]:
    return [m.group(2) for m in URL_ATTR.finditer(html)] + re.findall(r"url\(([^)]*)\)", html, re.I)


@pytest.fixture
def reading(settings, r, mailboxes) -> Any:
    return make_app(settings, r, webmail_url=WEBMAIL_URL).test_client()


def test_no_url_in_a_mail_leads_back_into_the_webmail(reading, r) -> None:
    log_in_as(reading, ALICE)
    msg_id = put_message(r, ALICE, as_mail(1, SNEAKY))
    for remote in ("0", "1"):
        if remote == "1":  # the same holds once the user asked for remote content
            page = reading.get(f"/message/{msg_id}").text
            assert reading.post(f"/message/{msg_id}/remote",
                                data={"csrf_token": csrf(page)}).status_code == 302
        html = frame_of(reading, msg_id).text
        body = html.split("<body>", 1)[1]
        low = body.lower()
        for tag in ("<form", "<base", "<meta", "<button", "<input", "srcset", "url("):
            assert tag not in low, (tag, body)
        # Every URL left in the mail is absolute and outside: no relative one, none to this host.
        left = urls_in(body)
        assert left, body
        for url in left:
            assert re.match(r"(https://(outside|tracker)\.example/|mailto:ann@remote\.test$|data:)", url), url
        tags = " ".join(re.findall(r"<[^>]*>", low))
        for name in ("localhost", "webmail.example.org", "evil.example", "%77ebmail", "remote=1",
                     "compose", "logout", "#top", "frame", "/remote"):
            assert name not in tags.replace("tracker.example/pixel", ""), (name, body)
        # The links lost only their URL: their text is still there to read.
        for text in ("show images", "compose", "own host", "public name", "protocol relative"):
            assert text in body
        assert '<a href="https://outside.example/page?x=1" target="_blank" ' \
               'rel="noopener noreferrer">outside</a>' in body
        assert 'href="mailto:ann@remote.test"' in body
        assert ('src="https://tracker.example/pixel.gif"' in body) == (remote == "1")


def test_remote_content_is_not_enabled_by_a_query_string(reading, r) -> None:
    log_in_as(reading, ALICE)
    msg_id = put_message(r, ALICE, as_mail(2, SNEAKY))
    for path in (f"/message/{msg_id}?remote=1", f"/message/{msg_id}/body?remote=1"):
        response = reading.get(path)
        assert response.status_code == 200
        assert "tracker.example" not in response.text
    page = reading.get(f"/message/{msg_id}?remote=1").text
    assert "Show remote content" in page and "remote=1" not in page
    csp = reading.get(f"/message/{msg_id}/body?remote=1").headers["Content-Security-Policy"]
    assert "img-src data:;" in csp and "http:" not in csp
    assert r.hget(keys.message(ALICE, msg_id), fields.REMOTE) is None


def test_showing_remote_content_needs_the_sessions_csrf_token(reading, r) -> None:
    token = log_in_as(reading, ALICE)
    msg_id = put_message(r, ALICE, as_mail(3, SNEAKY))
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "x" * 43}, {"csrf_token": token[:-1]}):
        response = reading.post(f"/message/{msg_id}/remote", data=data)
        assert response.status_code == 400
        assert "This form has expired or did not come from this site, so nothing was done." in response.text
        assert r.hget(keys.message(ALICE, msg_id), fields.REMOTE) is None
        assert "img-src data:;" in frame_of(reading, msg_id).headers["Content-Security-Policy"]
    # A token in the query string is never read for a POST.
    assert reading.post(f"/message/{msg_id}/remote?csrf_token={token}").status_code == 400
    assert r.hget(keys.message(ALICE, msg_id), fields.REMOTE) is None
    # GET is not the way either.
    assert reading.get(f"/message/{msg_id}/remote").status_code == 405

    response = reading.post(f"/message/{msg_id}/remote", data={"csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == f"/message/{msg_id}"
    frame = frame_of(reading, msg_id)
    assert "img-src data: http: https:;" in frame.headers["Content-Security-Policy"]
    assert 'src="https://tracker.example/pixel.gif"' in frame.text
    page = reading.get(f"/message/{msg_id}").text
    assert "Show remote content" not in page and "were blocked" not in page
    # The choice is this message's alone, and kept with it (a new session sees it too).
    other = put_message(r, ALICE, as_mail(4, SNEAKY))
    assert "img-src data:;" in frame_of(reading, other).headers["Content-Security-Policy"]
    log_in_as(reading, ALICE)
    assert 'src="https://tracker.example/pixel.gif"' in frame_of(reading, msg_id).text
    # Nothing else of the message changed: its bytes and flags are as they were.
    meta, raw = store.MailboxReader(r, ALICE).message(msg_id)
    assert raw == as_mail(3, SNEAKY) and meta[fields.FLAGS] == fields.SEEN
    assert msg_id in store.MailboxReader(r, ALICE).ids(fields.INBOX)


def test_remote_choice_only_on_own_existing_messages(reading, r) -> None:
    token = log_in_as(reading, ALICE)
    bobs = put_message(r, BOB, as_mail(5, SNEAKY))
    missing = new_id()
    for msg_id in (bobs, missing, "not-an-id"):
        response = reading.post(f"/message/{msg_id}/remote", data={"csrf_token": token})
        assert response.status_code == 404
        assert "There is nothing here (or it is not yours)." in response.text
    assert r.hget(keys.message(BOB, bobs), fields.REMOTE) is None
    assert not r.exists(keys.message(ALICE, bobs)) and not r.exists(keys.message(ALICE, missing))


def test_own_host_is_compared_as_a_browser_reads_it() -> None:
    from web import render

    own = frozenset({"webmail.example.org", "127.0.0.1"})
    for url in ("https://WEBMAIL.example.org./x", "https://user@webmail.example.org/",
                "https://webmail.example.org\\@evil.example/", "https:\\\\webmail.example.org/",
                "http://2130706433/", "http://0x7f.1/", "http://127.1:8080/",
                "https://\uff57ebmail.example.org/", " \x01https://webmail.example.org/"):
        assert render.outside_url(url, own) is None, url
    # The host is what follows the user part: here outside, so the link stays.
    assert render.outside_url("https://webmail.example.org@outside.example/", own) == \
        "https://webmail.example.org@outside.example/"
    assert render.outside_url(" https://outside.example/a ", own) == "https://outside.example/a"
    assert render.outside_url("https://127.0.0.2/", own) == "https://127.0.0.2/"


@pytest.mark.browser
@pytest.mark.slow
def test_browser_button_shows_remote_images_and_mail_links_cannot(webmail, receiver, browser, r) -> None:  # noqa: F811
    base = webmail
    with Listener() as listener:
        html = (f'<p>Hello</p><img src="{listener.url}/r/pixel.gif" alt="pixel">'
                f'<a href="?remote=1">see the pictures</a> <a href="{base}/?remote=1">see them here</a> '
                f'<a href="remote">or here</a>')
        smtp_send(receiver.port, [(ALICE, as_mail(7, html))])
        page = browser.new_page()
        log_in(page, base, ALICE)
        page.get_by_role("link", name="hostile 7").click()
        page.wait_for_load_state("networkidle")
        msg_url = page.url
        frame = page.frame_locator("iframe.body")
        assert frame.locator("img[alt=pixel]").count() == 1  # the frame rendered the mail ...
        assert frame.locator("img[src]").count() == 0  # ... without its remote image
        # Clicking every link of the mail (they lost their URLs) turns nothing on.
        for link in frame.locator("a").all():
            assert link.get_attribute("href") is None
            link.click(timeout=2000, no_wait_after=True)
        page.goto(msg_url + "?remote=1")
        page.wait_for_load_state("networkidle")
        assert listener.hits == []
        assert page.get_by_role("button", name="Show remote content").count() == 1

        page.get_by_role("button", name="Show remote content").click()
        page.wait_for_url(msg_url)
        page.wait_for_load_state("networkidle")
        assert listener.hits and set(listener.hits) == {"/r/pixel.gif"}
        pixel = page.frame_locator("iframe.body").locator("img[alt=pixel]")
        pixel.wait_for(state="attached", timeout=5000)
        assert pixel.get_attribute("src") == f"{listener.url}/r/pixel.gif"
        assert page.get_by_role("button", name="Show remote content").count() == 0


def test_settings_webmail_url_host_counts_as_own(settings, r, mailboxes) -> None:
    app = make_app(replace(settings, webmail_url="https://mail.provider.test:8443/webmail"), r)
    client = app.test_client()
    log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, as_mail(8, '<a href="https://MAIL.provider.test/compose">x</a>'
                                              '<a href="https://other.provider.test/">y</a>'))
    body = frame_of(client, msg_id).text
    assert "mail.provider.test" not in body.lower() and 'href="https://other.provider.test/"' in body
