"""Drawn pages kept for an identical next request (web/pagecache.py): never a page whose data
changed, never another user's, language's or zone's page, never a stale nonce or CSRF token,
and bounded by bytes (issue 17)."""

from __future__ import annotations

import re

import pytest

from fallback.mailbox import fields, store
from fallback.ops import incident
from tests.webutil import log_in_as, make_app, put_message, simple
from web.pagecache import PageCache, freeze

ALICE, BOB = "alice@example.com", "bob@example.com"


def _cache(client) -> PageCache:
    cache: PageCache = client.application.extensions["fallback"].pages
    return cache


def _nonce(response) -> str:
    m = re.search(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"])
    assert m
    return m.group(1)


def test_a_page_is_kept_at_its_limit_and_dropped_past_it() -> None:
    cache = PageCache(800)  # pages up to 100 bytes are kept
    cache.put("a", cache.cut("x" * 100))
    assert cache.fill(cache.get("a") or (), "n", "c") == b"x" * 100
    cache.put("big", cache.cut("x" * 101))  # past an eighth of the cache: never kept
    assert cache.get("big") is None
    cache.put("wide", cache.cut("é" * 51))  # 51 characters, 102 bytes: bytes are what count
    assert cache.get("wide") is None
    for n in range(7):
        cache.put(n, cache.cut("y" * 100))
    assert cache.used == 800 and len(cache) == 8  # at the limit: everything kept
    cache.get("a")  # used last: kept when the next page needs room
    cache.put("next", cache.cut("z" * 100))
    assert cache.used == 800 and len(cache) == 8
    assert cache.get(0) is None and cache.get("a") is not None and cache.get("next") is not None


@pytest.mark.parametrize("page", ["", "plain", "NONCE", "CSRF", "é NONCE ü CSRF€NONCENONCE CSRFCSRF ✓",
                                  "NONCECSRF", "csrfNONCEnonce", "nonce CSRF"])
def test_a_kept_page_is_filled_as_replacing_its_marks_would(page: str) -> None:
    cache = PageCache(1 << 20)
    drawn = page.replace("NONCE", cache.nonce_mark).replace("CSRF", cache.csrf_mark)
    nonce, csrf = "AbC-_123nonce", "csrf-XYZ_789"
    assert cache.fill(cache.cut(drawn), nonce, csrf) == page.replace("NONCE", nonce).replace(
        "CSRF", csrf).encode()


def test_freeze_keys_on_every_value_and_refuses_what_it_cannot_hold() -> None:
    assert freeze({"a": [1, {"b": "c"}]}) == (("a", (1, (("b", "c"),))),)
    assert freeze({"a": [1]}) != freeze({"a": [2]})
    with pytest.raises(TypeError):
        freeze({"a": object()})


def test_the_same_inbox_again_is_the_same_page_with_this_response_nonce_and_token(client, r) -> None:
    token = log_in_as(client, ALICE)
    put_message(r, ALICE, simple("first"))
    cache = _cache(client)
    one = client.get("/")
    hits = cache.hits
    two = client.get("/")
    assert cache.hits == hits + 1  # the second was not drawn again
    for response in (one, two):
        html = response.text
        nonce = _nonce(response)
        assert html.count(f'nonce="{nonce}"') >= 2 and f'value="{token}"' in html
        assert cache.nonce_mark not in html and cache.csrf_mark not in html
    assert _nonce(one) != _nonce(two)
    assert two.text == one.text.replace(_nonce(one), _nonce(two))


def test_new_mail_a_flag_and_a_move_show_at_once(client, r) -> None:
    log_in_as(client, ALICE)
    first = put_message(r, ALICE, simple("first"))
    assert "first" in client.get("/").text
    second = put_message(r, ALICE, simple("second"))
    page = client.get("/").text
    assert "second" in page and page.index(second) < page.index(first)
    store.set_flags(r, ALICE, first, add=(fields.SEEN,))
    assert re.search(rf'<li class="read"[^>]*data-delete="/message/{first}/delete"', client.get("/").text)
    store.set_flags(r, ALICE, second, add=(fields.FLAGGED,))
    assert "Flagged," in client.get("/").text
    store.move(r, ALICE, first, fields.TRASH)
    assert first not in client.get("/").text
    assert first in client.get("/folder/trash").text


def test_each_user_language_and_zone_has_its_own_page(web_app, r) -> None:
    alice, bob = web_app.test_client(), web_app.test_client()
    log_in_as(alice, ALICE)
    log_in_as(bob, BOB)
    put_message(r, ALICE, simple("for alice only"))
    assert "for alice only" in alice.get("/").text
    assert "for alice only" not in bob.get("/").text
    assert "Boîte de réception" in alice.get("/", headers={"Accept-Language": "fr"}).text
    assert "Boîte de réception" not in alice.get("/").text
    alice.set_cookie("tz", "Asia/Tokyo")
    assert 'content="Asia/Tokyo"' in alice.get("/").text
    alice.delete_cookie("tz")
    assert 'content="Asia/Tokyo"' not in alice.get("/").text


def test_the_live_incident_text_shows_on_a_kept_page(client, r) -> None:
    log_in_as(client, ALICE)
    put_message(r, ALICE, simple("first"))
    assert "Mailstore 3 is back" not in client.get("/").text
    incident.set_text(r, "Mailstore 3 is back at 14:00.", "ops")
    client.application.extensions["fallback"].incident = incident.IncidentCache(0)
    assert "Mailstore 3 is back at 14:00." in client.get("/").text


def test_a_message_page_is_kept_and_follows_its_flags(client, r) -> None:
    token = log_in_as(client, ALICE)
    msg = put_message(r, ALICE, simple("read me", body="The body text"))
    client.get(f"/message/{msg}")  # marks it read: the record changed, so the next is drawn again
    one = client.get(f"/message/{msg}")
    cache = _cache(client)
    hits = cache.hits
    two = client.get(f"/message/{msg}")
    assert cache.hits == hits + 1 and "The body text" in two.text
    assert two.text == one.text.replace(_nonce(one), _nonce(two))
    assert f'value="{token}"' in two.text
    assert 'value="unflag"' not in two.text
    flagged = client.post(f"/message/{msg}/flags", data={"csrf_token": token, "action": "flag"})
    assert flagged.status_code == 302
    assert 'value="unflag"' in client.get(f"/message/{msg}").text


def test_off_draws_every_page(settings, r, mailboxes) -> None:
    app = make_app(settings, r, web_page_cache=0)
    client = app.test_client()
    log_in_as(client, ALICE)
    put_message(r, ALICE, simple("first"))
    client.get("/")
    client.get("/")
    assert _cache(client).hits == 0 and len(_cache(client)) == 0
    assert "first" in client.get("/").text


def test_the_setting_takes_sizes() -> None:
    """(Its refusals are in tests/test_config.py's table of bad settings.)"""
    from fallback.config import load_settings

    assert load_settings({"web_page_cache": "8MiB"}, env={}).web_page_cache == 8 * 1024 * 1024
    assert load_settings({}, env={"FALLBACK_WEB_PAGE_CACHE": "0"}).web_page_cache == 0
