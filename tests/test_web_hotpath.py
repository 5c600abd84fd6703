"""What a page served again still works out per request, done once (issue 17): the message and
its conversation in one round trip, the page's language chosen once, the webmail's own host
names once per Host header (bounded).  Each gives what the longer way gave, and a change shows
at once."""

from __future__ import annotations

import pytest
from flask_babel import get_locale

from fallback.mailbox import store, threads
from tests.webutil import log_in_as, put_message, simple
from web import i18n, render
from web.context import HOSTS_KEPT
from web.mailbox import own_hosts

ALICE = "alice@example.com"


def test_the_message_and_its_conversation_in_one_read_are_what_two_reads_give(client, r) -> None:
    first = put_message(r, ALICE, simple("plans", body="one"))
    threads.catch_up(r, ALICE)
    reader = store.MailboxReader(r, ALICE)
    meta, raw, current = reader.message_page(first)  # type: ignore[misc]
    assert (meta, raw) == reader.message(first)
    assert current == threads.current_conversation(r, ALICE, first) == ([first], 1)
    # A reply not indexed yet: the one read catches the index up, as current_conversation does.
    reply = put_message(r, ALICE, simple("Re: plans", body="two"))
    found = reader.message_page(reply)
    assert found is not None and found[2] == ([first, reply], 2)
    assert reader.message_page("01M8SQBB972XX28TGNWD3TQRW2") is None  # no such message


def test_a_reply_shows_in_the_conversation_of_a_kept_message_page_at_once(client, r) -> None:
    log_in_as(client, ALICE)
    first = put_message(r, ALICE, simple("plans", body="one"))
    client.get(f"/message/{first}")  # marks it read
    assert "Conversation" not in client.get(f"/message/{first}").text  # a conversation of one
    reply = put_message(r, ALICE, simple("Re: plans", body="two"))
    page = client.get(f"/message/{first}").text
    assert "Conversation · 2 messages" in page and f'href="/message/{reply}"' in page


@pytest.mark.parametrize(("cookie", "header", "code"), [
    (None, None, "en"), (None, "", "en"), (None, "fr-FR,fr;q=0.9", "fr"), (None, "de;q=0.5,es", "es"),
    (None, "ja", "en"), ("de", "fr", "de"), ("xx", "es", "es"), ("xx", None, "en"),
])
def test_the_language_chosen_once_is_the_one_the_page_is_drawn_in(web_app, cookie, header, code) -> None:
    headers = {"Accept-Language": header} if header is not None else {}
    if cookie is not None:
        headers["Cookie"] = f"{i18n.COOKIE}={cookie}"
    with web_app.test_request_context("/", headers=headers):
        assert i18n.select_locale() == code
        assert str(get_locale()) == i18n.current() == code
        assert i18n.select_locale() == code  # asked again: the same, not chosen again


def test_a_language_switch_shows_on_a_kept_page_at_once(client, r) -> None:
    log_in_as(client, ALICE)
    put_message(r, ALICE, simple("first"))
    assert "Boîte de réception" not in client.get("/").text
    client.set_cookie(i18n.COOKIE, "fr")
    assert "Boîte de réception" in client.get("/").text
    client.set_cookie(i18n.COOKIE, "en")
    assert "Boîte de réception" not in client.get("/").text


def test_own_hosts_are_kept_per_host_header_at_the_limit_and_one_past_it(web_app) -> None:
    kept = web_app.extensions["fallback"].hosts

    def hosts(host: str) -> frozenset[str]:
        with web_app.test_request_context("/", headers={"Host": host}):
            return own_hosts()

    assert hosts("Mail.Example.COM:8443") == frozenset({"mail.example.com"})
    assert hosts("2130706433") == frozenset({render.url_host("127.0.0.1")})
    for n in range(HOSTS_KEPT - 2):
        assert hosts(f"h{n}.test") == frozenset({f"h{n}.test"})
    assert len(kept) == HOSTS_KEPT  # at the limit: all kept
    misses = kept.misses
    assert hosts("Mail.Example.COM:8443") == frozenset({"mail.example.com"}) and kept.misses == misses
    hosts("one-past.test")  # one past: the least recently used goes
    assert len(kept) == HOSTS_KEPT and kept.get("2130706433") is None
    assert kept.get("Mail.Example.COM:8443") is not None
