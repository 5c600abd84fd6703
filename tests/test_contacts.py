"""Address suggestions: GET /contacts on the real app and redis-server, contacts recorded from real
SMTP deliveries (several client addresses) and from webmail sends, the directory's name index."""

from __future__ import annotations

import smtplib
import time

import pytest

from fallback import keys
from fallback.mailbox import contacts, directory, dirindex
from tests.conftest import add_mailbox
from tests.test_web_compose import send
from tests.webutil import log_in_as, make_app, put_message, simple

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.org"


def suggest(client, q: str) -> list[dict[str, str]]:
    resp = client.get("/contacts", query_string={"q": q})
    assert resp.status_code == 200, resp.text
    assert resp.headers["Cache-Control"] == "no-store"
    return resp.get_json()


def test_best_first_and_at_most_ten(client, r) -> None:
    # Twelve people wrote; ann07 three times, ann03 twice, the rest once (newest last).
    senders = [f"Ann Number{n:02d} <ann{n:02d}@remote.test>" for n in range(12)]
    for n, sender in enumerate(senders):
        put_message(r, ALICE, simple(f"note {n}", sender=sender))
    for _ in range(2):
        put_message(r, ALICE, simple("again", sender=senders[7]))
    put_message(r, ALICE, simple("more", sender=senders[3]))
    log_in_as(client, ALICE)
    found = suggest(client, "ann")
    assert len(found) == contacts.MAX_RESULTS == 10
    assert found[0] == {"address": "ann07@remote.test", "name": "Ann Number07"}
    assert found[1]["address"] == "ann03@remote.test"
    # Then by recency: the newest single writers first.
    assert [f["address"] for f in found[2:5]] == ["ann11@remote.test", "ann10@remote.test",
                                                  "ann09@remote.test"]
    # Case-insensitive, on the address and on each word of the name; nothing else matches.
    assert [f["address"] for f in suggest(client, "NUMBER05")] == ["ann05@remote.test"]
    assert [f["address"] for f in suggest(client, "ann05@REM")] == ["ann05@remote.test"]
    assert suggest(client, "umber") == []
    assert suggest(client, "remote") == []  # the domain is not a prefix of the address


def test_contacts_from_real_smtp_deliveries(receiver, client, r) -> None:
    for source, sender in (("127.0.0.2", "Zoë Ångström <zoe@remote.test>"),
                           ("127.0.0.3", "Paul Martin <paul@other.test>")):
        with smtplib.SMTP("127.0.0.1", receiver.port, source_address=(source, 0)) as smtp:
            smtp.sendmail("bounce@remote.test", [ALICE], simple("hi", sender=sender))
    log_in_as(client, ALICE)
    assert suggest(client, "ång") == [{"address": "zoe@remote.test", "name": "Zoë Ångström"}]
    assert suggest(client, "mart") == [{"address": "paul@other.test", "name": "Paul Martin"}]
    # Only alice met them: bob's suggestions do not include them.
    log_in_as(client, BOB)
    assert suggest(client, "zoe") == [] and suggest(client, "paul") == []


def test_contacts_from_webmail_sends_bcc_included(client, r) -> None:
    log_in_as(client, ALICE)
    resp, _ = send(client, to="Bert Builder <bert@remote.test>", cc="cc.person@remote.test",
                   bcc="Hidden Helper <hidden@remote.test>", subject="plans", body="hello")
    assert resp.status_code == 302
    assert suggest(client, "bui") == [{"address": "bert@remote.test", "name": "Bert Builder"}]
    assert suggest(client, "cc.") == [{"address": "cc.person@remote.test", "name": ""}]
    assert suggest(client, "help") == [{"address": "hidden@remote.test", "name": "Hidden Helper"}]


def test_directory_users_of_the_own_domain_only(client, r, settings) -> None:
    add_mailbox(r, settings, "beatrice@example.com")
    add_mailbox(r, settings, "boris@example.org")
    log_in_as(client, ALICE)
    assert [f["address"] for f in suggest(client, "b")] == ["beatrice@example.com", BOB]
    assert [f["address"] for f in suggest(client, "bo")] == [BOB]
    assert suggest(client, "carol") == []  # example.org: another domain
    assert suggest(client, "alice") == []  # not oneself
    log_in_as(client, CAROL)
    assert [f["address"] for f in suggest(client, "b")] == ["boris@example.org"]
    # A removed mailbox is no longer suggested.
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    assert d.remove("boris@example.org")
    assert suggest(client, "b") == []


def test_contacts_directory_false_lists_only_own_contacts(settings, r, mailboxes) -> None:
    client = make_app(settings, r, contacts_directory=False).test_client()
    put_message(r, ALICE, simple("hi", sender="Bella <bella@remote.test>"))
    log_in_as(client, ALICE)
    assert suggest(client, "b") == [{"address": "bella@remote.test", "name": "Bella"}]


def test_not_logged_in_gets_401_and_no_list(client, r) -> None:
    put_message(r, ALICE, simple("hi", sender="Bella <bella@remote.test>"))
    resp = client.get("/contacts?q=b")
    assert resp.status_code == 401
    assert resp.get_json() == {"error": "Log in again to get address suggestions."}


def test_bad_and_empty_queries(client) -> None:
    log_in_as(client, ALICE)
    assert suggest(client, "") == [] and suggest(client, "   ") == []
    assert client.get("/contacts").get_json() == []
    assert suggest(client, "b" * contacts.MAX_QUERY) == []  # at the limit: looked up
    resp = client.get("/contacts", query_string={"q": "b" * (contacts.MAX_QUERY + 1)})
    assert resp.status_code == 400
    assert resp.get_json() == {"error": "Type at most 100 characters to look up an address."}
    assert suggest(client, "\x00<>[") == []


def test_contacts_are_capped_lowest_dropped(r) -> None:
    now = int(time.time() * 1000)
    seen = [contacts.Seen(f"p{n:03d}@remote.test", f"Person {n}", now - (contacts.CAP - n) * 1000)
            for n in range(contacts.CAP)]
    contacts.record(r, ALICE, seen)
    assert r.zcard(keys.contacts(ALICE)) == contacts.CAP
    assert r.hlen(keys.contact_names(ALICE)) == contacts.CAP
    contacts.record(r, ALICE, [contacts.Seen("newest@remote.test", "New One", now)])
    assert r.zcard(keys.contacts(ALICE)) == contacts.CAP
    assert r.hlen(keys.contact_names(ALICE)) == contacts.CAP
    assert r.zscore(keys.contacts(ALICE), "p000@remote.test") is None  # the oldest went
    assert r.hget(keys.contact_names(ALICE), "p000@remote.test") is None
    assert r.zscore(keys.contacts(ALICE), "newest@remote.test") is not None
    assert r.zscore(keys.contacts(ALICE), "p001@remote.test") is not None


def test_weight_prefers_recent_and_frequent() -> None:
    day = 86400 * 1000
    now = int(time.time() * 1000)
    assert contacts.weight(now) > contacts.weight(now - day)
    assert contacts.weight(now - contacts.HALF_LIFE_S * 1000) == pytest.approx(contacts.weight(now) / 2)
    # Three messages a week ago outweigh one today.
    assert 3 * contacts.weight(now - 7 * day) > contacts.weight(now)


def test_name_index_by_prefix_buckets(r) -> None:
    dirindex.add(r, [f"user{n:05d}@big.test" for n in range(20000)]
                 + ["x@small.test", "jo@small.test", "joe@small.test", "josé@small.test"])
    assert dirindex.lookup(r, "big.test", "user0001", 11) == [f"user{n:05d}@big.test" for n in range(10, 20)]
    assert dirindex.lookup(r, "big.test", "u", 11) == [f"user{n:05d}@big.test" for n in range(11)]
    assert dirindex.lookup(r, "small.test", "u", 11) == []
    assert dirindex.lookup(r, "small.test", "jo", 11) == ["jo@small.test", "joe@small.test",
                                                          "josé@small.test"]
    assert dirindex.lookup(r, "small.test", "jos", 11) == ["josé@small.test"]
    assert dirindex.lookup(r, "big.test", "@", 11) == []
    # A small domain is one small hash (listpack), a few bytes a name, like the directory.
    assert r.object("encoding", keys.dir_name_index("small.test")) == b"listpack"
    dirindex.remove(r, ["joe@small.test"])
    assert dirindex.lookup(r, "small.test", "jo", 11) == ["jo@small.test", "josé@small.test"]
    assert dirindex.rebuild(r, ["late@big.test"]) == 1  # made again: only what it is given
    assert dirindex.lookup(r, "big.test", "la", 11) == ["late@big.test"]
    assert dirindex.lookup(r, "big.test", "u", 11) == [] == dirindex.lookup(r, "small.test", "jo", 11)


def test_a_directory_from_before_the_index_gets_it_at_the_next_provision(client, r, settings, redis_url,
                                                                         tmp_path, capsys) -> None:
    from fallback.cli import main

    add_mailbox(r, settings, "bruno@example.com")
    for key in r.scan_iter("dirn:*"):  # as a directory provisioned before the index existed
        r.delete(key)
    log_in_as(client, ALICE)
    assert suggest(client, "br") == []
    src = tmp_path / "more.csv"
    src.write_text("address,password,mailstore\nbrigitte@example.com,{PLAIN}pw,default\n")
    assert main(["provision", str(src), "--redis-url", redis_url]) == 0
    capsys.readouterr()
    assert [f["address"] for f in suggest(client, "br")] == ["brigitte@example.com", "bruno@example.com"]
    assert r.exists(keys.DIR_NAME_INDEX_BUILT)
    # Built once: a later run does not read the whole directory again.
    assert dirindex.ensure(r, iter(["never@example.com"])) is None
