"""The templates' fast paths give exactly what the slow ones gave (issue 17, web/templating.py):
constant `_()` texts compiled into each language's templates, `url_for` kept per URL, and
each message parsed once for its page and its frame (web.mailbox.rendered); each cache
bounded, tested at its limit and one past it, and a change shown at once."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import url_for

from fallback.mailbox import fields
from tests.webutil import log_in_as, make_app, put_message, simple
from web import templating
from web.pagecache import Kept
from web.render import Rendered, rendered_size

ALICE, BOB = "alice@example.com", "bob@example.com"
SOURCE = ("{{ _('Inbox') }}|{{ _(\"Skip to content\") }}|"
          "{{ _('Page %(page)s of %(pages)s', page=1, pages=2) }}|{{ _('Service notices')|upper }}|"
          "{% set t = {'d': _('Delete')} %}{{ t.d ~ '<' }}|{{ _('No such text') }}|"
          "{{ _('a' 'b') }}|{{ ngettext('%(num)s message', '%(num)s messages', 3) }}")


def _norm(html: str) -> str:
    html = re.sub(r'nonce="[^"]*"', 'nonce="N"', html)
    html = re.sub(r'name="csrf_token" value="[^"]*"', 'name="csrf_token" value="C"', html)
    # A compose form's own draft id, its signature and its send keys: new on every form.
    return re.sub(r'name="(draft|draft_sig|idem|token|send_key)" value="[^"]*"', r'name="\1" value="D"', html)


@pytest.mark.parametrize("lang", ["en", "fr", "de", "es"])
def test_a_texts_compiled_in_are_what_the_call_gives(web_app: Any, lang: str) -> None:
    with web_app.test_request_context("/", headers={"Cookie": f"lang={lang}"}):
        web_app.preprocess_request()
        env = web_app.jinja_env.for_language()
        assert env is not None and env.page_translations is not None
        compiled = env.compile(SOURCE, raw=True)
        plain = web_app.jinja_env.compile(SOURCE, raw=True)
        # The plain environment calls `_` for every text; the language's only where it must
        # (the text with variables, the one of two literals), the others are in the code.
        call = "context.call((undefined(name='_')"
        assert plain.count(call) == 7 and compiled.count(call) == 2
        context: dict[str, Any] = {}
        web_app.update_template_context(context)
        slow = web_app.jinja_env.from_string(SOURCE).render(context)
        assert env.from_string(SOURCE).render(context) == slow
        assert web_app.jinja_env.get_template("base.html").environment is env  # in a request: its language's


@pytest.mark.parametrize("lang", ["en", "fr", "de", "es"])
def test_every_page_is_the_same_with_the_texts_compiled_in(settings, r, mailboxes, lang: str) -> None:
    fast, slow = make_app(settings, r, web_page_cache=0), make_app(settings, r, web_page_cache=0)
    slow.jinja_env.for_language = lambda: None  # type: ignore[method-assign]  # every `_()` called
    msg = put_message(r, ALICE, simple("<b>Hello</b> & 100% \"sure\"", body="Body"))
    put_message(r, ALICE, simple("Sent one", sender=ALICE, to=BOB), folder=fields.SENT)
    pages = ["/", "/?page=2", "/?q=hello", "/folder/sent", "/folder/trash", "/folder/drafts",
             f"/message/{msg}", "/compose", f"/compose?reply={msg}", "/status", "/nope"]
    clients = []
    for app in (fast, slow):
        client = app.test_client()
        client.set_cookie("lang", lang)
        log_in_as(client, ALICE)
        clients.append(client)
    for page in pages:  # each page from both apps before the next (a message page marks it read)
        one, two = (_norm(c.get(page).text) for c in clients)
        assert one == two, page
    one, two = (_norm(app.test_client().get("/login").text) for app in (fast, slow))
    assert one == two
    assert fast.jinja_env.languages and not slow.jinja_env.languages


def test_past_its_languages_a_page_is_drawn_by_the_plain_environment(web_app: Any) -> None:
    env = web_app.jinja_env
    with web_app.test_request_context("/", headers={"Cookie": "lang=fr"}):
        web_app.preprocess_request()
        for n in range(templating.MAX_LANGUAGES - 1):
            env.languages[f"x{n}"] = env  # the limit less one: French still gets its own
        assert env.for_language() is env.languages["fr"]
        assert len(env.languages) == templating.MAX_LANGUAGES
    with web_app.test_request_context("/", headers={"Cookie": "lang=de"}):
        web_app.preprocess_request()
        assert env.for_language() is None  # one past it
        assert "de" not in env.languages
        assert env.get_template("base.html") is not None


def test_links_are_url_for_and_kept_up_to_the_limit(web_app: Any) -> None:
    links = templating.Links(web_app, limit=3)
    assert links.plain  # no host matching, subdomains or url_defaults here
    with web_app.test_request_context("/"):
        asked = [("static", {"filename": "app.css"}), ("mailbox.inbox", {}),
                 ("i18n.switch", {"code": "fr", "next": "/?q=a b&c=ü"})]
        for endpoint, values in asked:
            assert links.url_for(endpoint, **values) == url_for(endpoint, **values)
        assert len(links.built) == 3  # at the limit: all kept
        assert links.url_for("mailbox.inbox") == "/" and len(links.built) == 3  # a hit
        assert links.url_for("mailbox.folder", name="sent") == url_for("mailbox.folder", name="sent")
        assert len(links.built) == 1  # one past it: started over
        assert links.url_for("mailbox.inbox", _external=True) == url_for("mailbox.inbox", _external=True)
        assert len(links.built) == 1  # external URLs name the host: never kept
    with web_app.test_request_context("/", base_url="http://localhost/mail/"):
        assert url_for("mailbox.folder", name="sent") == "/mail/folder/sent"
        assert links.url_for("mailbox.folder", name="sent") == "/mail/folder/sent"  # the script root is keyed


def test_kept_values_at_their_limit_and_one_past_it() -> None:
    kept: Kept[Rendered] = Kept(8 * 200, rendered_size)
    shown = Rendered(headers={"Subject": "x" * 29}, text="x" * 100)  # 36 + 100 + 64: 200
    assert rendered_size(shown) == 200
    for n in range(8):
        kept.put(n, shown)
    assert len(kept) == 8 and kept.used == 1600  # at the limit: all kept
    kept.get(0)
    kept.put(8, shown)  # one past it: the least recently used goes
    assert len(kept) == 8 and kept.get(1) is None and kept.get(0) is not None
    kept.put("big", Rendered(headers={}, text="x" * 137))  # 201, over an eighth: never kept
    assert kept.get("big") is None


def test_a_message_is_parsed_once_for_its_page_and_frame(client, r) -> None:
    token = log_in_as(client, ALICE)
    html = ('Content-Type: text/html\r\nMIME-Version: 1.0\r\n\r\n'
            '<p>Hi <img src="https://x.test/i.png"></p>')
    raw = (f"From: ann@remote.test\r\nTo: {ALICE}\r\nSubject: pic\r\n{html}").encode()
    msg = put_message(r, ALICE, raw)
    renders = client.application.extensions["fallback"].renders
    page = client.get(f"/message/{msg}")
    assert "Show remote content" in page.text and renders.misses == 1
    body = client.get(f"/message/{msg}/body")
    assert renders.hits == 1 and renders.misses == 1  # the frame: parsed once
    assert "x.test" not in body.text
    client.set_cookie("lang", "fr")
    assert client.get(f"/message/{msg}").text != page.text
    assert renders.misses == 1  # another language: the same body
    # The remote choice is part of the key: shown at once.
    assert client.post(f"/message/{msg}/remote", data={"csrf_token": token}).status_code == 302
    assert "https://x.test/i.png" in client.get(f"/message/{msg}/body").text
    assert renders.misses == 2


def test_a_render_is_never_another_users(web_app, r) -> None:
    raw = simple("same bytes", body="Same body")
    one, two = web_app.test_client(), web_app.test_client()
    log_in_as(one, ALICE)
    log_in_as(two, BOB)
    a, b = put_message(r, ALICE, raw), put_message(r, BOB, raw)
    renders = web_app.extensions["fallback"].renders
    assert "Same body" in one.get(f"/message/{a}").text
    assert "Same body" in two.get(f"/message/{b}").text
    assert renders.misses == 2 and renders.hits == 0
    assert two.get(f"/message/{a}").status_code == 404


def test_off_keeps_no_render(settings, r, mailboxes) -> None:
    app = make_app(settings, r, web_page_cache=0)
    client = app.test_client()
    log_in_as(client, ALICE)
    msg = put_message(r, ALICE, simple("first", body="Body one"))
    assert "Body one" in client.get(f"/message/{msg}").text
    assert "Body one" in client.get(f"/message/{msg}").text
    assert len(app.extensions["fallback"].renders) == 0


@pytest.mark.parametrize("here", ["/", "/?q=a b&page=2", "/message/01M8SD00000000000000000001?sent=1",
                                  "/?q=%C3%BC+%26+%23x", "/lang/_?next=/lang/_?x", "/?q=\u00fc\u2603'\"<>"])
def test_the_language_links_are_url_fors(web_app: Any, here: str) -> None:
    from web import i18n

    for base in ("http://localhost/", "http://localhost/mail/"):
        with web_app.test_request_context("/", base_url=base):
            assert i18n.switch_links(here) == [(code, name, url_for("i18n.switch", code=code, next=here))
                                               for code, name in i18n.NAMES.items()]


def test_one_catalogue_lookup_per_request(web_app: Any) -> None:
    from flask_babel import get_translations

    from web import i18n

    with web_app.test_request_context("/", headers={"Cookie": "lang=de"}):
        web_app.preprocess_request()
        assert i18n.translations() is get_translations()
        assert i18n.translations().ugettext("Inbox") == "Posteingang"


def test_no_flask_cookie_session_is_opened_or_sent(web_app: Any, client) -> None:
    from flask import session

    log_in_as(client, ALICE)
    client.set_cookie("session", "anything.at.all")  # a stale Flask cookie changes nothing
    response = client.get("/")
    assert response.status_code == 200
    assert "Vary" not in response.headers and "session=" not in response.headers.get("Set-Cookie", "")
    with web_app.test_request_context("/"):
        web_app.preprocess_request()
        assert dict(session) == {}
        with pytest.raises(RuntimeError):
            session["x"] = "y"  # nothing may rely on it


def test_a_date_element_formats_its_moment_once_and_reads_as_before(web_app: Any) -> None:
    from web import filters, prefs

    zone = prefs.parse_zone("Asia/Tokyo")
    assert zone is not None
    with web_app.test_request_context("/", headers={"Cookie": "lang=de"}):
        web_app.preprocess_request()
        shown = filters.epoch(1796156303, zone)
        long = filters._long(filters._local(1796156303, zone.tz))  # type: ignore[arg-type]
        assert long.endswith(" JST") and "Dez" in long
        assert shown == f'<time datetime="2026-12-02T05:18:23+09:00" title="{long}">{long}</time>'
