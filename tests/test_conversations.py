"""Conversations: the message page's list across INBOX and Sent (a reply sent from the webmail
included), the subject fallback and its window, the grouped folder list and its toggle, the
index's bounded catch-up; real SMTP deliveries from several client addresses, real redis-server;
and one browser test (suggestions while typing, the conversation list, axe and 390 px)."""

from __future__ import annotations

import re
import smtplib
import time
from pathlib import Path

import pytest

from fallback import keys
from fallback.mailbox import fields, store, threads
from tests.test_web_browser import ARGS as CHROMIUM_ARGS
from tests.test_web_browser import (
    ARTIFACTS,
    CHROMIUM,
    DESKTOP,
    PHONE,
    log_in,
    webmail,  # noqa: F401 - fixture
)
from tests.test_web_compose import send
from tests.webutil import csrf, log_in_as, make_app, put_message, simple

ALICE, BOB = "alice@example.com", "bob@example.com"
DAY = 86400 * 1000
AXE = Path(__file__).resolve().parent.parent / ".tools" / "axe" / "node_modules" / "axe-core" / "axe.min.js"


def smtp(port: int, source: str, raw: bytes, rcpt: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0)) as client:
        client.sendmail("bounce@remote.test", [rcpt], raw)


def mail(subject: str, sender: str, msgid: str, body: str, extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: Alice <{ALICE}>\r\nSubject: {subject}\r\n"
            f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{msgid}>\r\n{extra}"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()


def inbox_ids(r, address: str = ALICE) -> list[str]:
    return [i.decode() for i in r.zrange(keys.folder(address, fields.INBOX), 0, -1)]


def conversation_items(page: str) -> list[str]:
    """Each row of the message page's conversation list, its tags removed, spaces collapsed."""
    nav = re.search(r'<nav class="conversation.*?</nav>', page, re.S)
    if nav is None:
        return []
    items = re.findall(r"<li.*?</li>", nav.group(0), re.S)
    return [" ".join(re.sub(r"<[^>]+>", " ", i).split()) for i in items]


def current_row(page: str) -> int:
    nav = re.search(r'<nav class="conversation.*?</nav>', page, re.S)
    assert nav is not None
    items = re.findall(r"<li.*?</li>", nav.group(0), re.S)
    marked = [n for n, i in enumerate(items) if 'aria-current="page"' in i]
    assert len(marked) == 1
    return marked[0]


def shift(r, address: str, msg_id: str, by_ms: int) -> None:
    """Move a stored message back in time (as if it had come `by_ms` earlier)."""
    key = keys.message(address, msg_id)
    ts = int(r.hget(key, fields.TS)) - by_ms
    folder = r.hget(key, fields.FOLDER).decode()
    r.hset(key, fields.TS, ts)
    r.zadd(keys.folder(address, folder), {msg_id: ts})


def test_reply_sent_from_the_webmail_is_in_the_conversation(receiver, settings, r, mailboxes) -> None:
    client = make_app(settings, r, undo_send_seconds=0).test_client()
    smtp(receiver.port, "127.0.0.2", mail("Budget 2027", "Dana Scully <dana@remote.test>",
                                          "budget.1@remote.test", "Can you check the budget?\nThanks"))
    smtp(receiver.port, "127.0.0.3", mail("Lunch", "Fox <fox@other.test>", "lunch@other.test", "Pizza?"))
    first, lunch = inbox_ids(r)
    log_in_as(client, ALICE)
    page = client.get(f"/message/{first}").text
    assert conversation_items(page) == []  # a conversation of one message lists nothing

    resp, reply_id = send(client, f"?reply={first}", to="Dana Scully <dana@remote.test>",
                          subject="Re: Budget 2027", body="Looks fine to me.\n\n> Can you check")
    assert resp.status_code == 302
    assert r.zrange(keys.folder(ALICE, fields.SENT), 0, -1) == [reply_id.encode()]
    # Dana answers the reply: In-Reply-To names the webmail's Message-ID.
    sent_msgid = (store.MailboxReader(r, ALICE).meta(reply_id) or {})[fields.MSGID]
    smtp(receiver.port, "127.0.0.2", mail(
        "Re: Budget 2027", "Dana Scully <dana@remote.test>", "budget.3@remote.test", "Great, thanks!",
        extra=f"In-Reply-To: {sent_msgid}\r\nReferences: <budget.1@remote.test> {sent_msgid}\r\n"))
    last = inbox_ids(r)[-1]
    assert last not in (first, lunch)

    page = client.get(f"/message/{last}").text
    rows = conversation_items(page)
    assert len(rows) == 3 and "Conversation · 3 messages" in page
    assert rows[0].startswith("Dana Scully") and "Can you check the budget?" in rows[0]
    assert rows[1].startswith("To Dana Scully") and "Sent" in rows[1] and "Looks fine to me." in rows[1]
    assert rows[2].startswith("Dana Scully") and "Great, thanks!" in rows[2]
    assert current_row(page) == 2
    assert f'href="/message/{reply_id}"' in page
    # The same list from the first message and from the reply in Sent; lunch is not in it.
    assert current_row(client.get(f"/message/{first}").text) == 0
    sent_page = client.get(f"/message/{reply_id}").text
    assert current_row(sent_page) == 1 and len(conversation_items(sent_page)) == 3
    assert lunch not in page and conversation_items(client.get(f"/message/{lunch}").text) == []

    # Deleted for good since: gone from the list, and from the index.
    r.delete(keys.message(ALICE, first))
    r.zrem(keys.folder(ALICE, fields.INBOX), first)
    page = client.get(f"/message/{last}").text
    assert len(conversation_items(page)) == 2 and "Conversation · 2 messages" in page
    assert r.hget(keys.thread_of(ALICE), first) is None
    # Another user's mailbox has none of it.
    log_in_as(client, BOB)
    assert client.get(f"/message/{last}").status_code == 404


def test_subject_fallback_within_the_window_and_not_past_it(client, r) -> None:
    a = put_message(r, ALICE, simple("Quarterly plans", sender="x@remote.test"))
    b = put_message(r, ALICE, simple("RE[2]: quarterly   PLANS", sender="y@remote.test"))
    c = put_message(r, ALICE, simple("AW: WG: Quarterly plans", sender="z@remote.test"))
    d = put_message(r, ALICE, simple("Re: something else", sender="x@remote.test",
                                     extra="In-Reply-To: <Quarterly.plans@remote.test>\r\n"))
    shift(r, ALICE, a, 70 * DAY)
    shift(r, ALICE, b, 45 * DAY)          # 25 days after a: within the window
    shift(r, ALICE, c, 45 * DAY - threads.SUBJECT_WINDOW_MS - 1000)  # just past the window after b
    # d names a's Message-ID: a header link holds whatever the time or subject.
    log_in_as(client, ALICE)
    page = client.get(f"/message/{a}").text
    assert len(conversation_items(page)) == 3
    for other in (b, d):
        assert f'href="/message/{other}"' in page
    assert f'href="/message/{c}"' not in page
    assert conversation_items(client.get(f"/message/{c}").text) == []
    assert threads.thread_id(r, ALICE, b) == threads.thread_id(r, ALICE, a) == a


def set_ts(r, address: str, msg_id: str, ts: int) -> None:
    r.hset(keys.message(address, msg_id), fields.TS, ts)
    r.zadd(keys.folder(address, fields.INBOX), {msg_id: ts})


def test_subject_window_at_its_limit_and_one_ms_past_it(r) -> None:
    now = int(time.time() * 1000)
    a = put_message(r, ALICE, simple("Edge", sender="x@remote.test"))
    b = put_message(r, ALICE, simple("Re: Edge", sender="y@remote.test"))
    c = put_message(r, ALICE, simple("Fwd: Edge", sender="z@remote.test"))
    set_ts(r, ALICE, a, now - 2 * threads.SUBJECT_WINDOW_MS - 1)
    set_ts(r, ALICE, b, now - threads.SUBJECT_WINDOW_MS - 1)  # the window after a: joined
    set_ts(r, ALICE, c, now)                                  # the window and 1 ms after b: not
    threads.catch_up(r, ALICE)
    assert threads.thread_id(r, ALICE, b) == a
    assert threads.thread_id(r, ALICE, c) == c


@pytest.mark.parametrize(("subject", "normal"), [
    ("Re: Plans", "plans"), ("RE: re: Plans", "plans"), ("Fwd: Plans", "plans"), ("FW: Plans", "plans"),
    ("AW: WG: Plans", "plans"), ("SV: Plans", "plans"), ("Re[2]: Plans", "plans"),
    ("RE(3): Plans", "plans"), ("Antw: Plans", "plans"), ("TR: Plans", "plans"),
    ("[team] Re: Plans", "plans"), ("  Plans   for   May ", "plans for may"), ("Re:", ""),
    ("Réunion", "réunion"), ("Reply needed", "reply needed"), ("Review: plans", "review: plans"),
])
def test_normalize_subject(subject: str, normal: str) -> None:
    assert threads.normalize_subject(subject) == normal


def test_grouped_list_and_its_toggle_remembered_across_logins(client, r) -> None:
    first = put_message(r, ALICE, simple("Trip", sender="Ann <ann@remote.test>"))
    put_message(r, ALICE, simple("Lonely", sender="Bea <bea@remote.test>"))
    put_message(r, ALICE, simple("Re: Trip", sender="Cid <cid@remote.test>",
                                 extra="In-Reply-To: <Trip@remote.test>\r\n"))
    newest = put_message(r, ALICE, simple("Re: Trip", sender="Dee <dee@remote.test>",
                                          extra="References: <Trip@remote.test>\r\n"))
    token = log_in_as(client, ALICE)
    page = client.get("/").text
    assert "4 messages" in page and 'aria-pressed="false"' in page
    # Without the CSRF token the choice is refused and nothing changes.
    refused = client.post("/folder/inbox/group", data={"group": "1"})
    assert refused.status_code == 400 and "nothing was" in refused.text
    assert "4 messages" in client.get("/").text
    resp = client.post("/folder/inbox/group", data={"group": "1", "csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"] == "/"
    # A new session (log out, log in): still grouped.
    log_in_as(client, ALICE)
    page = client.get("/").text
    assert "2 conversations" in page and 'aria-pressed="true"' in page
    rows = re.findall(r'<a href="/message/([^"]+)" data-open>(.*?)</a>', page, re.S)
    assert rows[0][0] == newest and first not in [i for i, _ in rows]
    assert ">3<span class=\"vh\"> messages</span>" in rows[0][1]
    assert "Dee" in rows[0][1] and "Bea" in rows[1][1]
    assert "4 messages" in client.get("/?group=0").text  # one page either way, the choice kept
    assert "2 conversations" in client.get("/").text
    resp = client.post("/folder/inbox/group", data={"group": "0", "csrf_token": csrf(page)})
    assert "4 messages" in client.get("/").text
    nowhere = client.post("/folder/nowhere/group", data={"group": "1", "csrf_token": csrf(page)})
    assert nowhere.status_code == 404


def test_index_catches_up_in_bounded_batches(r, monkeypatch) -> None:
    monkeypatch.setattr(threads, "BATCH", 5)
    monkeypatch.setattr(threads, "MAX_BATCHES", 2)
    ids = [put_message(r, ALICE, simple(f"n{n}", sender="x@remote.test")) for n in range(23)]
    done = [threads.catch_up(r, ALICE) for _ in range(4)]
    # At most BATCH * MAX_BATCHES a call (a call goes on from the last one's last message, which
    # it reads again and skips), all of them in the end.
    assert done[0] == 10 and max(done) == 10 and sum(done) == 23 and done[-1] == 0
    assert r.hlen(keys.thread_of(ALICE)) == 23
    assert all(threads.thread_id(r, ALICE, i) == i for i in ids)  # 23 subjects, 23 conversations
    # One request at a time: while another holds the lock, a call does nothing.
    late = put_message(r, ALICE, simple("n1", sender="y@remote.test"))
    r.set(keys.thread_lock(ALICE), "1", px=5000)
    assert threads.catch_up(r, ALICE) == 0
    r.delete(keys.thread_lock(ALICE))
    assert threads.catch_up(r, ALICE) == 1
    assert threads.thread_id(r, ALICE, late) == ids[1]


def axe_violations(page) -> list[str]:
    """axe-core run through the DevTools protocol: the page keeps its own CSP."""
    if not AXE.exists():
        pytest.fail(f"{AXE} missing: run `make test` (deploy/install-deps.sh test installs axe-core)")
    page.evaluate(AXE.read_text())
    return list(page.evaluate("async () => (await axe.run(document)).violations"
                              ".map(v => v.id + ': ' + v.help + ' (' + v.nodes.length + ')')"))


def check(page, what: str) -> None:
    assert axe_violations(page) == [], what
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], what
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{what.replace(' ', '-')}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


@pytest.mark.browser
@pytest.mark.slow
def test_browser_suggestions_and_conversation(webmail, receiver, r, tmp_path) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    base = webmail
    smtp(receiver.port, "127.0.0.2", mail("Garden party", "Dana Scully <dana@remote.test>",
                                          "party.1@remote.test", "Are you coming on Sunday?"))
    smtp(receiver.port, "127.0.0.3", mail(
        "Re: Garden party", "Daniel Roe <daniel@other.test>", "party.2@other.test", "I am, with cake.",
        extra="In-Reply-To: <party.1@remote.test>\r\nReferences: <party.1@remote.test>\r\n"))
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport=DESKTOP)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "resource" not in m.text
                else None)
        failed: list[str] = []  # a browser asks for /favicon.ico on its own: not the pages' doing
        page.on("response", lambda resp: failed.append(resp.url) if resp.status >= 400
                and not resp.url.endswith("/favicon.ico") else None)
        log_in(page, base, ALICE)
        # The inbox grouped by conversation (the toggle is a button, its state announced).
        with page.expect_navigation():  # the POST's redirect back to the inbox, not the old page
            page.get_by_role("button", name="Group by conversation").click()
        toggle = page.get_by_role("button", name="Group by conversation")
        assert toggle.get_attribute("aria-pressed") == "true"
        assert page.get_by_text("1 conversation", exact=False).count() >= 1
        check(page, "inbox grouped by conversation")
        page.get_by_role("link", name="Re: Garden party").click()
        page.wait_for_load_state()
        nav = page.get_by_role("navigation", name=re.compile("Conversation"))
        assert nav.get_by_role("link").count() == 2
        assert nav.locator("[aria-current=page]").inner_text().startswith("Daniel Roe")
        check(page, "message with a conversation")

        page.goto(f"{base}/compose")
        page.locator("#to").press_sequentially("da", delay=30)
        options = page.locator("#to-suggestions option")
        options.first.wait_for(state="attached", timeout=10000)
        values = sorted(o.get_attribute("value") for o in options.all())
        assert values == ["Dana Scully <dana@remote.test>", "Daniel Roe <daniel@other.test>"]
        # A second address after a comma keeps the first one in each suggestion.
        page.locator("#cc").fill("bob@example.com, ")
        page.locator("#cc").press_sequentially("dan", delay=30)
        cc_options = page.locator("#cc-suggestions option")
        deadline = time.monotonic() + 10
        while cc_options.count() != 2 and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert sorted(o.get_attribute("value") for o in cc_options.all()) == [
            "bob@example.com, Dana Scully <dana@remote.test>",
            "bob@example.com, Daniel Roe <daniel@other.test>"]
        check(page, "compose with suggestions")
        assert errors == [] and failed == []  # no CSP refusal, no script error, nothing missing
        context.close()


def test_threading_headers_stored_at_delivery_only_well_formed_ids(r) -> None:
    refs = " ".join(f"<r{n}@x.test>" for n in range(30))
    raw = simple("ids", extra=(f"In-Reply-To: junk <a@x.test> <b@x.test>\r\nReferences: {refs}\r\n"
                               " <bad id> <\u2028@x>\r\n"))
    msg_id = put_message(r, ALICE, raw)
    meta = store.MailboxReader(r, ALICE).meta(msg_id) or {}  # either record layout (issue 17)
    assert meta[fields.INREPLYTO] == "b@x.test"  # the last well-formed id of In-Reply-To
    assert meta[fields.REFERENCES].split() == [f"r{n}@x.test" for n in range(10, 30)]  # the nearest 20
    assert store.MailboxReader(r, ALICE).raw(msg_id) == raw  # the bytes as they came
