"""The admin console at /admin/ (web/console) through the Flask test client on the real Redis.

Real deliveries come from the real receiver (with a counting, tracing mail log, as `fallback
smtp` runs it) over smtplib from two loopback addresses; queue entries are made by the
queues' own submit/enqueue; the reconcile state by the state scripts.  Redis work per page is
counted with INFO commandstats deltas.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import smtplib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from fallback import ids, keys
from fallback.config import Settings
from fallback.mailbox import directory, fields
from fallback.ops import audit, failover, incident, metrics, tokens, trace
from fallback.queues import forward, forward_ops, hold, outbound
from fallback.redisconn import async_client
from tests.conftest import ReceiverThread
from tests.webutil import make_app, simple

ADMIN = "console-admin-token-0123456789abcdef"
_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
BODY = b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: fwd\r\n\r\nhello\r\n"


def console_app(settings: Settings, r: redis.Redis, **overrides: Any) -> Any:
    return make_app(settings, r, admin_token=ADMIN, cookie_secure=False, failover_cache_ttl=0.001,
                    **overrides)


def csrf_of(html: str) -> str:
    m = _CSRF.search(html)
    assert m, "no csrf_token in the page"
    return m.group(1)


def log_in(client: Any, token: str = ADMIN) -> Any:
    form = client.get("/admin/login")
    assert form.status_code == 200
    return client.post("/admin/login", data={"csrf_token": csrf_of(form.get_data(as_text=True)),
                                             "token": token})


def logged_in(client: Any) -> str:
    """Log in; the session's CSRF token (from the dashboard's log-out form)."""
    assert log_in(client).status_code == 302
    return csrf_of(client.get("/admin/").get_data(as_text=True))


def text(response: Any) -> str:
    return str(response.get_data(as_text=True))


def audit_actions(r: redis.Redis) -> list[audit.Entry]:
    return audit.recent(r, 100)


@pytest.fixture
def app(settings: Settings, r: redis.Redis, mailboxes: list[str]) -> Any:
    return console_app(settings, r)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def test_console_is_off_without_an_admin_token(settings: Settings, r: redis.Redis,
                                               mailboxes: list[str]) -> None:
    c = make_app(settings, r, admin_token=None).test_client()
    for path in ("/admin/", "/admin/login", "/admin/affected", "/admin/queues/outbound"):
        assert c.get(path).status_code == 404, path
    assert c.post("/admin/login", data={"token": ADMIN}).status_code == 404


def test_log_in_and_out_with_its_own_strict_cookie(client: Any, r: redis.Redis, settings: Settings) -> None:
    first = client.get("/admin/")
    assert first.status_code == 302 and first.headers["Location"].endswith("/admin/login")
    done = log_in(client)
    assert done.status_code == 302 and done.headers["Location"].endswith("/admin/")
    cookie = next(h for h in done.headers.getlist("Set-Cookie") if h.startswith("fallback_console="))
    assert "Path=/admin" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # cookie_secure off here; see the test below
    page = client.get("/admin/")
    assert page.status_code == 200 and "Dashboard" in text(page)
    assert "nonce-" in page.headers["Content-Security-Policy"]
    entry = audit_actions(r)[0]
    assert (entry.action, entry.actor, entry.outcome) == ("console login", "admin", "ok")
    out = client.post("/admin/logout", data={"csrf_token": csrf_of(text(page))})
    assert out.status_code == 302 and "out=1" in out.headers["Location"]
    assert "You have logged out of the console." in text(client.get("/admin/login?out=1"))
    assert client.get("/admin/").status_code == 302
    assert not list(r.scan_iter("consess:*"))  # the session is gone from Redis, not just the cookie


def test_the_cookie_is_secure_when_asked_and_a_webmail_session_is_not_a_console_one(
        settings: Settings, r: redis.Redis, mailboxes: list[str]) -> None:
    from tests.webutil import log_in_as

    app = make_app(settings, r, admin_token=ADMIN, cookie_secure=True)
    c = app.test_client()
    form = c.get("/admin/login", base_url="https://localhost")
    cookie = next(h for h in form.headers.getlist("Set-Cookie") if h.startswith("fallback_console_login="))
    assert "Secure" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    web = make_app(settings, r, admin_token=ADMIN, cookie_secure=False).test_client()
    log_in_as(web, "alice@example.com")
    assert web.get("/admin/").status_code == 302  # the webmail's cookie opens nothing here


def test_wrong_token_is_refused_throttled_audited_and_counted(settings: Settings, r: redis.Redis,
                                                              mailboxes: list[str]) -> None:
    app = console_app(settings, r, login_source_failures=2)
    c = app.test_client()
    wrong = log_in(c, "not-the-token")
    assert wrong.status_code == 401
    assert ("Wrong token. Use the admin token (admin_token or admin_token_file of the settings)."
            in text(wrong))
    assert "fallback_console=" not in " ".join(wrong.headers.getlist("Set-Cookie"))
    entry = audit_actions(r)[0]
    assert (entry.action, entry.actor, entry.outcome) == ("console login", "unknown", "failed: wrong token")
    assert entry.args["client"] == "127.0.0.1"
    throttled = None
    for _ in range(10):  # the delay starts at 1 s after the threshold and doubles (bounded)
        reply = log_in(c, "still-wrong")
        if reply.status_code == 429:
            throttled = reply
            break
    assert throttled is not None, "never throttled"
    assert re.search(r"Too many attempts\. Try again in \d+ seconds?\.", text(throttled))
    assert int(throttled.headers["Retry-After"]) >= 1
    # While throttled even the right token is not looked at: no session.
    held = log_in(c, ADMIN)
    assert held.status_code == 429 and c.get("/admin/").status_code == 302
    assert audit_actions(r)[0].outcome == "throttled"
    with app.app_context():
        app.extensions["fallback"].counters.flush(r)
    failures = metrics.totals(r)[metrics.ADMIN_AUTH_FAILURES]
    assert failures[(("reason", "wrong"),)] >= 2 and failures[(("reason", "throttled"),)] >= 1


def test_a_reseller_token_cannot_log_in(client: Any, r: redis.Redis) -> None:
    token, _rec = tokens.create(r, ["example.com"], "shop", None, "test")
    reply = log_in(client, token)
    assert reply.status_code == 403
    assert ("That is a reseller token. Reseller tokens cannot log in to the console: only the admin "
            "token can (admin_token or admin_token_file of the settings).") in text(reply)
    assert client.get("/admin/").status_code == 302
    assert audit_actions(r)[0].outcome == "refused: reseller token shop"


def test_missing_csrf_is_400_and_changes_nothing(client: Any, r: redis.Redis) -> None:
    expired = client.post("/admin/login", data={"token": ADMIN})
    assert expired.status_code == 400 and "This log-in form has expired. Please try again." in text(expired)
    empty = log_in(client, "")
    assert empty.status_code == 400 and "Enter the admin token." in text(empty)
    logged_in(client)
    for data in ({"text": "Mail is delayed"}, {"text": "Mail is delayed", "csrf_token": "forged"}):
        reply = client.post("/admin/incident", data=data)
        assert reply.status_code == 400
        assert "This form has expired or did not come from this console, so nothing was done." in text(reply)
    assert incident.read(r) is None
    assert not [e for e in audit_actions(r) if e.action == "incident set"]


class CountingReceiver(ReceiverThread):
    """The real receiver with the counting, tracing mail log `fallback smtp` gives it."""

    async def _start(self) -> int:
        from fallback.intake.receiver import ReceiverServer

        self.maillog, self.counters = metrics.mail_counting(3600, trace.TraceBuffer(3600, "intake"))
        r = async_client(self.settings.redis_url or "")
        buckets = await directory.ensure_buckets_async(r, self.settings.directory_buckets)
        self.server = ReceiverServer(self.settings, r, buckets, self.maillog)
        return await self.server.start()


@pytest.fixture
def counting_receiver(settings: Settings, mailboxes: list[str]) -> Iterator[CountingReceiver]:
    rt = CountingReceiver(settings)
    rt.start()
    yield rt
    rt.stop()


def deliver(port: int, source: str, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        s.mail("ann@remote.test")
        replies = {rcpt: s.rcpt(rcpt) for rcpt in rcpts}
        if any(code == 250 for code, _ in replies.values()):
            s.data(simple("console", to=rcpts[0]))
    return replies


def mark(settings: Settings, address: str, rstate: str) -> None:
    """Write a reconcile state through reconcile's own state script."""
    from fallback.reconcile.state import NEVER, MessageStates, Record

    async def run() -> None:
        ar = async_client(settings.redis_url or "")
        states = MessageStates(ar)
        msg_id = (await states.pending(address))[0]
        await states.record(address, [Record(msg_id, NEVER, "", {fields.RSTATE: rstate})])
        await ar.aclose()

    asyncio.run(run())


def test_dashboard_shows_real_intake_queues_reconcile_and_memory(
        client: Any, r: redis.Redis, counting_receiver: CountingReceiver, settings: Settings) -> None:
    failover.start(r, ["default"])
    deliver(counting_receiver.port, "127.0.0.2", ["alice@example.com", "bob@example.com"])
    refused = deliver(counting_receiver.port, "127.0.0.3", ["nobody@example.com"])
    assert refused["nobody@example.com"][0] == 550
    counting_receiver.counters.flush(r)
    counting_receiver.counters.trace.flush(r)  # type: ignore[union-attr]
    outbound.submit(r, sender="alice@example.com", mailstore="default", recipients=["x@example.org"],
                    raw=BODY, msg_id=ids.new_id())
    forward.enqueue(r, ["carol@example.org"], ids.new_id(), BODY, "someone@example.org")
    # A partial reconcile: alice's copy done, bob's left "appending" (a run that stopped).
    mark(settings, "alice@example.com", fields.DONE)
    mark(settings, "bob@example.com", fields.APPENDING)
    logged_in(client)
    page = text(client.get("/admin/"))
    assert "failed over: default" in page and "since" in page
    assert re.search(r"<strong>3</strong> affected mailbox", page)
    assert re.search(r"<strong>2</strong> deliveries accepted, <strong>1</strong> refused", page)
    assert re.search(r'<th scope="row">250</th><td>2</td>', page)
    assert re.search(r'<th scope="row">550</th><td>1</td>', page)
    queues = re.findall(r'kind=\w+|/admin/queues/(\w+)">\w+</a></th><td>(\d+)</td>', page)
    assert ("outbound", "1") in queues and ("forward", "1") in queues
    assert "used of" in page and "Redis memory" in page
    row = re.search(r'<th scope="row">default</th><td>yes</td>.*?</tr>', page, re.S)
    assert row, page
    cells = re.findall(r"<td>([^<]*)</td>", row.group(0))
    # alice: received + Sent copy, bob: received; one done, one appending, one pending
    assert cells[0] == "yes" and cells[2:] == ["3", "3", "1", "1", "1 (33%)", "0"], cells


def audit_of(r: redis.Redis, action: str) -> list[audit.Entry]:
    return [e for e in audit_actions(r) if e.action == action]


def test_outbound_queue_show_retry_hold_release_and_delete_with_confirmation(
        client: Any, r: redis.Redis) -> None:
    msg_id = ids.new_id()
    outbound.submit(r, sender="alice@example.com", mailstore="default", recipients=["x@example.org"],
                    raw=BODY, msg_id=msg_id)
    token = logged_in(client)
    listing = text(client.get("/admin/queues/outbound"))
    assert msg_id in listing and "alice@example.com" in listing and "1 in all" in listing
    assert msg_id in text(client.get(f"/admin/queues/outbound/{msg_id}"))
    missing = client.get(f"/admin/queues/outbound/{ids.new_id()}")
    assert missing.status_code == 404 and "is not in the outbound queue" in text(missing)
    bad = client.get("/admin/queues/outbound/nonsense")
    assert bad.status_code == 400 and "is not a message id" in text(bad)

    retried = client.post(f"/admin/queues/outbound/{msg_id}/retry", data={"csrf_token": token})
    assert retried.status_code == 302
    assert "Queued for delivery now." in text(client.get(retried.headers["Location"]))
    assert audit_of(r, "queue retry")[0].args["id"] == msg_id

    held = client.post(f"/admin/queues/outbound/{msg_id}/hold", data={"csrf_token": token, "reason": "spam?"})
    assert held.status_code == 302 and hold.get(r, "alice@example.com") is not None
    entry = audit_of(r, "queue hold")[0]
    assert entry.args["user"] == "alice@example.com" and entry.args["via"] == "console"
    assert "Release this sender" in text(client.get(f"/admin/queues/outbound/{msg_id}"))
    blocked = client.post(f"/admin/queues/outbound/{msg_id}/retry", data={"csrf_token": token})
    assert blocked.status_code == 400 and "is held with all mail from alice@example.com" in text(blocked)
    assert client.post(f"/admin/queues/outbound/{msg_id}/release",
                       data={"csrf_token": token}).status_code == 302
    assert hold.get(r, "alice@example.com") is None and audit_of(r, "queue release")

    confirm = client.get(f"/admin/queues/outbound/{msg_id}/delete")
    assert confirm.status_code == 200 and "Yes, delete it" in text(confirm)
    assert "1 recipient(s) not yet delivered are marked failed" in text(confirm)
    assert outbound.find(r, msg_id).record.pending() == ["x@example.org"]  # type: ignore[union-attr]
    assert not audit_of(r, "queue delete")  # asking is not doing
    gone = client.post(f"/admin/queues/outbound/{msg_id}/delete", data={"csrf_token": token})
    assert gone.status_code == 302 and f"Deleted {msg_id}" in text(client.get(gone.headers["Location"]))
    assert audit_of(r, "queue delete")[0].outcome == "ok: 1 recipient(s) marked failed"
    assert not [i for i in outbound.scan(r) if i.msg_id == msg_id and i.record and i.record.pending()]


def test_forward_queue_retry_hold_and_delete_with_confirmation(client: Any, r: redis.Redis) -> None:
    msg_id = ids.new_id()
    forward.enqueue(r, ["bob@example.com", "carol@example.org"], msg_id, BODY, "someone@example.org")
    token = logged_in(client)
    listing = text(client.get("/admin/queues/forward"))
    assert listing.count(msg_id) >= 2 and "carol@example.org" in listing
    held = client.post(f"/admin/queues/forward/{msg_id}/hold", data={"csrf_token": token})
    assert held.status_code == 302
    assert {i.where for i in forward_ops.find(r, msg_id)} == {"held"}
    assert audit_of(r, "queue forward-hold")[0].outcome == "ok: 2 recipient(s) held"
    assert client.post(f"/admin/queues/forward/{msg_id}/retry", data={"csrf_token": token}).status_code == 302
    assert "held" not in {i.where for i in forward_ops.find(r, msg_id)}
    assert audit_of(r, "queue forward-retry")[0].outcome == "ok: 2 of 2 recipient(s) due now"
    confirm = text(client.get(f"/admin/queues/forward/{msg_id}/delete"))
    assert "bob@example.com, carol@example.org" in confirm and "nobody is notified" in confirm
    assert len(forward_ops.find(r, msg_id)) == 2
    deleted = client.post(f"/admin/queues/forward/{msg_id}/delete", data={"csrf_token": token})
    assert deleted.status_code == 302
    assert not forward_ops.scan(r, only=msg_id)
    assert audit_of(r, "queue forward-delete")[0].outcome == "ok: 2 recipient(s) deleted"
    assert client.get("/admin/queues/nowhere").status_code == 404


def test_queue_list_pages_at_the_page_size(client: Any, r: redis.Redis) -> None:
    from web.console.queues import PAGE

    for _ in range(PAGE + 1):
        forward.enqueue(r, ["bob@example.com"], ids.new_id(), BODY, "someone@example.org")
    logged_in(client)
    first = text(client.get("/admin/queues/forward"))
    assert f"Messages 1 to {PAGE} of {PAGE + 1}" in first and "Next page" in first
    second = text(client.get(f"/admin/queues/forward?start={PAGE}"))
    assert f"Messages {PAGE + 1} to {PAGE + 1} of {PAGE + 1}" in second and "Next page" not in second


def provision(r: redis.Redis, settings: Settings, n: int, stores: tuple[str, ...] = ("s1", "s2"),
              batch: int = 5000) -> list[str]:
    """n mailboxes the way provisioning writes them (Directory.put_many: buckets, counts, index)."""
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    out: list[str] = []
    for start in range(0, n, batch):
        chunk = [directory.Mailbox(f"user{i:07d}@d{i % 7}.example", stores[i % len(stores)], "{PLAIN}x")
                 for i in range(start, min(start + batch, n))]
        d.put_many((m, None) for m in chunk)
        out.extend(m.address for m in chunk)
    return out


def provision_names(n: int) -> list[str]:
    return [f"user{i:07d}@d{i % 7}.example" for i in range(n)]


def follow(client: Any, url: str, limit: int = 200) -> list[str]:
    """Every address of every page from `url` on, following "Next page" (bounded)."""
    found: list[str] = []
    for _ in range(limit):
        page = text(client.get(url))
        found += re.findall(r'<tr><th scope="row">([^<]+@[^<]+)</th>', page)
        nxt = re.search(r'<a href="([^"]+)" rel="next">Next page</a>', page)
        if not nxt:
            return found
        url = nxt.group(1).replace("&amp;", "&")
    raise AssertionError("too many pages")


def test_affected_users_search_paging_and_csv(client: Any, r: redis.Redis, settings: Settings) -> None:
    # 64 buckets (fixed at first use, so on an empty Redis): pages fill up, as with a million
    # users in 65,536.
    r.flushall()
    addresses = provision(r, replace(settings, directory_buckets=64), 700)
    failover.start(r, ["s1"])
    affected = {a for i, a in enumerate(addresses) if i % 2 == 0}
    logged_in(client)
    first = text(client.get("/admin/affected"))
    assert first.count('<tr><th scope="row">') == 50 and "Next page" in first
    assert set(follow(client, "/admin/affected")) == affected
    prefix = {a for a in affected if a.startswith("user00001")}
    assert set(follow(client, "/admin/affected?q=user00001")) == prefix and prefix
    indexed = {a for a in affected if a.startswith("user00002") and a.endswith("@d3.example")}
    assert set(follow(client, "/admin/affected?q=user00002@d3.example")) == indexed and indexed
    bad = client.get("/admin/affected?q=a%20b")
    assert bad.status_code == 400
    assert ("search for the start of an address: no spaces, quotes, &lt;, &gt;, commas or semicolons"
            in text(bad))
    too_long = client.get("/admin/affected?q=" + "a" * 321)
    assert too_long.status_code == 400 and "the search may be at most 320 characters" in text(too_long)
    assert client.get("/admin/affected?q=" + "a" * 320).status_code == 200
    bad_cursor = client.get("/admin/affected?cursor=zz")
    assert bad_cursor.status_code == 400 and "cursor is not one this API gave out" in text(bad_cursor)

    got = client.get("/admin/affected.csv")
    assert got.headers["Content-Type"].startswith("text/csv") and got.is_streamed
    rows = list(csv.DictReader(io.StringIO(text(got))))
    assert {row["address"] for row in rows} == affected and {row["mailstore"] for row in rows} == {"s1"}
    some = list(csv.DictReader(io.StringIO(text(client.get("/admin/affected.csv?q=user00001")))))
    assert {row["address"] for row in some} == prefix


def commands(r: redis.Redis) -> dict[str, int]:
    stats: Any = r.info("commandstats")
    return {k: int(v["calls"]) for k, v in stats.items()}


def redis_work(r: redis.Redis, fetch: Any) -> dict[str, int]:
    """Commands Redis ran for one request (INFO commandstats before and after; the INFO itself
    is counted once and taken off)."""
    before = commands(r)
    fetch()
    after = commands(r)
    delta = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}
    delta["cmdstat_info"] = delta.get("cmdstat_info", 1) - 1
    return {k: n for k, n in delta.items() if n}


def test_pages_do_redis_work_of_one_page_not_of_the_directory(client: Any, r: redis.Redis,
                                                            settings: Settings) -> None:
    logged_in(client)
    failover.start(r, ["s1", "s2"])
    small = redis_work(r, lambda: client.get("/admin/"))
    provision(r, settings, 20_000)
    big = redis_work(r, lambda: client.get("/admin/"))
    # The dashboard's commands do not depend on how many users there are (give or take the
    # re-reads of the webmail's few-second caches, the live incident text and the scope).
    assert abs(sum(big.values()) - sum(small.values())) <= 3, (small, big)
    assert "cmdstat_hgetall" in big and "cmdstat_scan" not in big and "cmdstat_hkeys" not in big
    page = redis_work(r, lambda: client.get("/admin/affected"))
    # One page: the first batches of directory buckets (64 each) until 50 rows, not 65,536 buckets.
    assert 0 < page["cmdstat_hgetall"] <= 4 * 64, page
    from fallback.ops.overview import BUCKET_BUDGET

    scan = redis_work(r, lambda: client.get("/admin/affected?q=user00123"))
    # A search by the start of an address reads at most BUCKET_BUDGET buckets (+1: the scope).
    assert BUCKET_BUDGET // 2 < scan["cmdstat_hgetall"] <= BUCKET_BUDGET + 1, scan
    search = redis_work(r, lambda: client.get("/admin/affected?q=user00123@d1.example"))
    # The name index: one field of the domain's (HMGET), then the matching mailboxes (one HMGET
    # per bucket), the failover scope (one HGETALL) and the session (one HMGET).
    names = [a for a in provision_names(20_000) if a.startswith("user00123") and a.endswith("@d1.example")]
    assert "cmdstat_hkeys" not in search and search.get("cmdstat_hgetall") == 1, search
    assert search["cmdstat_hmget"] <= len(names) + 2, search


def test_audit_log_pages_newest_first(client: Any, r: redis.Redis) -> None:
    for n in range(120):
        audit.write(r, None, "test action", "tester", {"n": n})
    logged_in(client)  # one more entry: the log-in
    pages = []
    url = "/admin/audit"
    for _ in range(10):
        page = text(client.get(url))
        pages.append([int(n) for n in re.findall(r"n=(\d+)", page)])
        nxt = re.search(r'<a href="([^"]+)" rel="next">Older</a>', page)
        if not nxt:
            break
        url = nxt.group(1)
    assert [len(p) for p in pages] == [49, 50, 21]  # the first page starts with the log-in
    assert [n for p in pages for n in p] == list(range(119, -1, -1))
    bad = client.get("/admin/audit?before=yesterday")
    assert bad.status_code == 400 and "That page of the audit log does not exist" in text(bad)


def test_incident_text_set_refused_and_cleared_with_audit(client: Any, r: redis.Redis) -> None:
    token = logged_in(client)
    at_limit = "x" * incident.MAX_LENGTH
    assert client.post("/admin/incident", data={"csrf_token": token, "text": at_limit}).status_code == 302
    assert incident.read(r).text == at_limit  # type: ignore[union-attr]
    past = client.post("/admin/incident", data={"csrf_token": token, "text": at_limit + "y"})
    assert past.status_code == 400
    assert f"the incident text has {incident.MAX_LENGTH + 1} characters; at most" in text(past)
    assert at_limit + "y" in text(past)  # what was typed is kept in the form
    control = client.post("/admin/incident", data={"csrf_token": token, "text": "Mail\nis late"})
    assert control.status_code == 400 and "control character (U+000A) at character 5" in text(control)
    empty = client.post("/admin/incident", data={"csrf_token": token, "text": "  "})
    assert empty.status_code == 400 and "The incident text is empty" in text(empty)
    assert incident.read(r).text == at_limit  # type: ignore[union-attr]
    assert len(audit_of(r, "incident set")) == 1
    done = client.post("/admin/incident", data={"csrf_token": token, "text": "Mail is delayed"})
    assert "The incident text is set" in text(client.get(done.headers["Location"]))
    assert client.post("/admin/incident/clear", data={"csrf_token": token}).status_code == 302
    assert incident.read(r) is None
    cleared = audit_of(r, "incident clear")[0]
    assert cleared.args["text"] == "Mail is delayed" and cleared.actor == "admin"


def test_trace_page_shows_a_real_message_and_refuses_bad_input(
        client: Any, r: redis.Redis, counting_receiver: CountingReceiver) -> None:
    failover.start(r, ["default"])
    deliver(counting_receiver.port, "127.0.0.2", ["alice@example.com"])
    counting_receiver.counters.flush(r)
    found = trace.recent(r, "alice@example.com")
    assert found, "the receiver traced nothing"
    msg_id = found[0]["id"]
    logged_in(client)
    page = text(client.get(f"/admin/trace?id={msg_id}"))
    assert "received" in page and "intake" in page
    listing = text(client.get("/admin/trace?address=alice@example.com"))
    assert msg_id in listing and "ann@remote.test" in listing
    bad = client.get("/admin/trace?id=nope")
    assert bad.status_code == 400 and "That is not a message id" in text(bad)
    unknown = client.get(f"/admin/trace?id={ids.new_id()}")
    assert unknown.status_code == 404 and "There is no trace of that message" in text(unknown)
    not_address = client.get("/admin/trace?address=not-an-address")
    assert not_address.status_code == 400 and "That is not an email address." in text(not_address)


def test_token_length_at_and_past_the_limit(client: Any, r: redis.Redis,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from web.console import MAX_TOKEN

    at = log_in(client, "x" * MAX_TOKEN)
    assert at.status_code == 401 and "Wrong token." in text(at)  # looked at, and wrong
    past = log_in(client, "x" * (MAX_TOKEN + 1))
    assert past.status_code == 400
    assert f"That is longer than {MAX_TOKEN} characters; no admin token is that long." in text(past)
    outcomes = [e.outcome for e in audit_of(r, "console login")]
    assert outcomes[:2] == ["failed: too long", "failed: wrong token"]
    with caplog.at_level("INFO"):
        log_in(client)
    assert any("event=login " in m and "user=admin-console" in m for m in caplog.messages), caplog.messages


def test_intake_counts_keep_the_last_hour_only(r: redis.Redis) -> None:
    from fallback.ops import intakerate

    now = 1_800_000_000.0 + 30  # mid-minute
    counts = {"mail_events\tevent=received\toutcome=250": 3, "mail_events\tevent=rejected\toutcome=550": 1,
              "webmail_logins\tresult=ok": 5}
    for minutes_ago in (0, intakerate.MINUTES - 1, intakerate.MINUTES):
        with r.pipeline(transaction=True) as pipe:
            intakerate.queue_minute(pipe, 3, counts, metrics.MAIL_EVENTS, now - 60 * minutes_ago)
            pipe.execute()
    hour = intakerate.last_hour(r, now)
    # This minute and the one 59 minutes ago count; the one 60 minutes ago does not.
    assert (hour.accepted_total, hour.refused_total) == (6, 2)
    assert hour.replies == {"250": 6, "550": 2}
    assert hour.accepted[0] == 3 and hour.accepted[-1] == 3 and sum(hour.accepted[1:-1]) == 0
    key = keys.metrics_minute_n(3, int(now // 60))
    assert 0 < int(r.ttl(key)) <= intakerate.KEEP
    assert set(r.hkeys(key)) == {b"event=received\toutcome=250", b"event=rejected\toutcome=550"}
