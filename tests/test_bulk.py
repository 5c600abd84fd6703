"""Bulk actions on folder pages, Empty Trash, delete forever, and the folders' unread counts.

Flask test client on the real app and the real redis-server; mail comes in through the real
receiver over smtplib from two loopback source addresses; the reconcile test appends into a
real Dovecot.
"""

from __future__ import annotations

import logging
import re
import smtplib
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.ids import new_id
from fallback.mailbox import bulk as mbulk
from fallback.mailbox import expunge, fields, store
from fallback.maillog import LOGGER_NAME
from fallback.ops import metrics
from tests.dovecot import MainStoreView
from tests.reconcile_helpers import ids_on_disk, reconcile_settings, run_engine
from tests.servers import wait_for
from tests.webutil import log_in_as, put_message, served, simple
from web.bulk import MAX_IDS

ALICE, BOB = "alice@example.com", "bob@example.com"
SHOWN = (fields.INBOX, fields.SENT, fields.TRASH)   # the folders whose unread count the list shows
TOO_MANY = ("You can act on at most 500 messages at once, so nothing was changed. "
            "Select fewer messages and try again.")


def flags_of(r: redis.Redis, address: str, msg_id: str) -> list[str]:
    value: Any = r.hget(keys.message(address, msg_id), fields.FLAGS)
    return (value or b"").decode().split()


def folder_of(r: redis.Redis, address: str, msg_id: str) -> str | None:
    value: Any = r.hget(keys.message(address, msg_id), fields.FOLDER)
    return value.decode() if value else None


def notice(html: str) -> str:
    m = re.search(r'<p class="notice" role="status">(.*?)</p>', html, re.S)
    assert m, "no notice on the page"
    return m.group(1)


def post_bulk(client: Any, token: str, folder: str, action: str, ids: list[str], **extra: str) -> Any:
    return client.post(f"/folder/{folder}/bulk",
                       data={"csrf_token": token, "action": action, "ids": ids, **extra})


def real_unread(r: redis.Redis, address: str) -> dict[str, int]:
    """Unread per folder, counted the slow way: every message's own flags and folder."""
    out = dict.fromkeys(SHOWN, 0)
    for _msg_id, meta, _raw in store.MailboxReader(r, address).iter_messages(SHOWN):
        if fields.SEEN not in meta.get("flags", "").split():
            out[meta["folder"]] += 1
    return out


def nav_counts(html: str) -> dict[str, int]:
    nav = html[html.index('<nav class="folders"'):html.index("</nav>")]
    out = {}
    for name, folder in (("Inbox", fields.INBOX), ("Sent", fields.SENT), ("Trash", fields.TRASH)):
        m = re.search(rf">{name}(?: <span class=\"count\">(\d+)</span>)?", nav)
        assert m, f"no {name} in the folder list"
        out[folder] = int(m.group(1) or 0)
    return out


def test_every_bulk_action_changes_only_the_ticked_messages(client, r) -> None:
    token = log_in_as(client, ALICE)
    a, b, c = (put_message(r, ALICE, simple(f"m{n}")) for n in range(3))
    response = post_bulk(client, token, "inbox", "read", [a, b])
    assert response.status_code == 302 and response.location.startswith("/?")
    page = client.get(response.location).text
    assert notice(page) == "2 messages marked read."
    assert fields.SEEN in flags_of(r, ALICE, a) and fields.SEEN in flags_of(r, ALICE, b)
    assert fields.SEEN not in flags_of(r, ALICE, c)
    assert not r.sismember(keys.unseen(ALICE), a) and r.sismember(keys.unseen(ALICE), c)
    assert '<span class="count">1</span>' in page

    page = client.get(post_bulk(client, token, "inbox", "unread", [a]).location).text
    assert notice(page) == "1 message marked unread." and r.sismember(keys.unseen(ALICE), a)
    page = client.get(post_bulk(client, token, "inbox", "flag", [b, c]).location).text
    assert notice(page) == "2 messages flagged."
    assert fields.FLAGGED in flags_of(r, ALICE, b) and fields.FLAGGED in flags_of(r, ALICE, c)
    assert fields.SEEN in flags_of(r, ALICE, b)   # the other flags stay
    page = client.get(post_bulk(client, token, "inbox", "unflag", [c]).location).text
    assert notice(page) == "1 message unflagged." and fields.FLAGGED not in flags_of(r, ALICE, c)

    r.delete(keys.pending(ALICE))
    page = client.get(post_bulk(client, token, "inbox", "delete", [a, c]).location).text
    assert notice(page) == "2 messages moved to Trash."
    assert folder_of(r, ALICE, a) == fields.TRASH and folder_of(r, ALICE, c) == fields.TRASH
    assert r.zscore(keys.folder(ALICE, fields.TRASH), a) and not r.zscore(keys.folder(ALICE, fields.INBOX), a)
    assert r.smembers(keys.pending(ALICE)) == {a.encode(), c.encode()}   # reconcile carries the moves

    trash = client.get("/folder/trash").text
    assert 'value="restore"' in trash and 'value="expunge"' in trash and 'value="delete"' not in trash
    assert "Empty Trash" in trash
    response = post_bulk(client, token, "trash", "restore", [a, b])
    assert response.location.startswith("/folder/trash?")
    assert notice(client.get(response.location).text) == "1 message restored. 1 message was not in Trash."
    assert folder_of(r, ALICE, a) == fields.INBOX and folder_of(r, ALICE, b) == fields.INBOX
    page = client.get(post_bulk(client, token, "inbox", "delete", [a, c]).location).text
    assert notice(page) == "1 message moved to Trash. 1 message was already in Trash."


def test_restore_puts_sent_mail_back_into_sent(client, r) -> None:
    token = log_in_as(client, ALICE)
    sent = put_message(r, ALICE, simple("mine", sender=ALICE, to=BOB), folder=fields.SENT,
                       flags=(fields.SEEN,), kind="sent")
    post_bulk(client, token, "sent", "delete", [sent])
    assert folder_of(r, ALICE, sent) == fields.TRASH
    post_bulk(client, token, "trash", "restore", [sent])
    assert folder_of(r, ALICE, sent) == fields.SENT
    assert r.zscore(keys.folder(ALICE, fields.SENT), sent) is not None
    # A move acts only on the page's own folder: a sent message ticked on a stale Inbox page stays.
    response = post_bulk(client, token, "inbox", "delete", [sent])
    assert notice(client.get(response.location).text) == (
        "0 messages moved to Trash. 1 message was not in this folder.")
    assert folder_of(r, ALICE, sent) == fields.SENT


def test_other_users_and_unknown_ids_are_counted_and_left_alone(client, r) -> None:
    token = log_in_as(client, ALICE)
    mine = [put_message(r, ALICE, simple(f"a{n}")) for n in range(2)]
    bobs = put_message(r, BOB, simple("for bob", to=BOB))
    response = post_bulk(client, token, "inbox", "read", [*mine, bobs, new_id(), "../../etc", mine[0]])
    page = client.get(response.location).text
    assert notice(page) == "2 messages marked read. 3 messages could not be found."
    assert fields.SEEN not in flags_of(r, BOB, bobs)
    assert r.sismember(keys.unseen(BOB), bobs)
    assert not r.exists(keys.message(ALICE, bobs))     # no stub record made in alice's keys
    post_bulk(client, token, "inbox", "delete", [bobs])
    assert folder_of(r, BOB, bobs) == fields.INBOX
    post_bulk(client, token, "trash", "expunge", [bobs])
    client.post("/folder/trash/expunge", data={"csrf_token": token, "ids": [bobs]})
    assert r.exists(keys.message(BOB, bobs))


def test_ids_per_request_at_the_limit_and_one_past_it(client, r, web_app, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    token = log_in_as(client, ALICE)
    real = [put_message(r, ALICE, simple(f"n{n}")) for n in range(3)]
    unknown = [new_id() for _ in range(MAX_IDS - len(real))]
    response = post_bulk(client, token, "inbox", "read", [*real, *unknown])
    assert response.status_code == 302
    assert notice(client.get(response.location).text) == (
        f"3 messages marked read. {MAX_IDS - 3} messages could not be found.")
    post_bulk(client, token, "inbox", "unread", real)
    response = post_bulk(client, token, "inbox", "read", [*real, *unknown, new_id()])
    assert response.status_code == 400
    assert TOO_MANY in response.text and "Traceback" not in response.text
    assert all(fields.SEEN not in flags_of(r, ALICE, i) for i in real)   # nothing changed
    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME
             and rec.getMessage().startswith("event=rejected ")]
    assert len(lines) == 1 and "outcome=400" in lines[0] and f"{MAX_IDS + 1} ids" in lines[0]
    web_app.extensions["fallback"].counters.flush(r)
    assert metrics.totals(r)[metrics.MAIL_EVENTS][(("event", "rejected"), ("outcome", "400"))] == 1


def test_refused_posts_change_nothing(client, r) -> None:
    token = log_in_as(client, ALICE)
    msg = put_message(r, ALICE, simple("x"))
    response = client.post("/folder/inbox/bulk", data={"action": "read", "ids": [msg]})
    assert response.status_code == 400
    assert "This form has expired or did not come from this site, so nothing was done." in response.text
    response = client.post("/folder/inbox/bulk", data={"csrf_token": "wrong", "action": "delete",
                                                        "ids": [msg]})
    assert response.status_code == 400
    response = post_bulk(client, token, "inbox", "explode", [msg])
    assert response.status_code == 400
    assert "That action is not available here, so nothing was changed." in response.text
    response = post_bulk(client, token, "inbox", "expunge", [msg])
    assert response.status_code == 400
    assert "Messages can be deleted for good from Trash only, so nothing was changed." in response.text
    assert post_bulk(client, token, "junk", "read", [msg]).status_code == 404
    assert flags_of(r, ALICE, msg) == [] and folder_of(r, ALICE, msg) == fields.INBOX
    response = post_bulk(client, token, "inbox", "read", [])
    assert notice(client.get(response.location).text) == "No messages were selected, so nothing was changed."


def test_page_and_search_are_kept(client, r) -> None:
    token = log_in_as(client, ALICE)
    msg = put_message(r, ALICE, simple("findme"))
    response = post_bulk(client, token, "inbox", "read", [msg], page="2", q="findme")
    assert response.location.startswith("/?") and "page=2" in response.location
    assert "q=findme" in response.location


def test_delete_forever_asks_first_then_frees_the_bytes(client, r) -> None:
    token = log_in_as(client, ALICE)
    keep = put_message(r, ALICE, simple("keep"))
    gone = put_message(r, ALICE, simple("gone", body="x" * 5000))
    size = sum(int(r.hget(keys.message(ALICE, i), fields.SIZE) or 0) for i in (keep, gone))
    post_bulk(client, token, "inbox", "delete", [keep, gone])
    before = int(r.hget(keys.info(ALICE), "bytes") or 0)
    confirm = post_bulk(client, token, "trash", "expunge", [gone])
    assert confirm.status_code == 200 and "Delete for good?" in confirm.text
    assert "This deletes the 1 selected message for good." in confirm.text
    assert f'name="ids" value="{gone}"' in confirm.text and 'action="/folder/trash/expunge"' in confirm.text
    assert r.exists(keys.message(ALICE, gone))       # nothing deleted before the confirmation
    response = client.post("/folder/trash/expunge", data={"csrf_token": token, "ids": [gone, keep, new_id()]})
    assert notice(client.get(response.location).text) == (
        "2 messages deleted for good. 1 message could not be found.")
    assert not r.exists(keys.message(ALICE, gone)) and not r.exists(keys.message(ALICE, keep))
    assert int(r.hget(keys.info(ALICE), "bytes") or 0) == before - size == 0   # the quota's usage
    assert int(r.hget(keys.info(ALICE), "messages") or 0) == 0
    assert r.hexists(keys.expunged(ALICE), gone) and r.sismember(keys.pending(ALICE), gone)
    assert r.zcard(keys.folder(ALICE, fields.TRASH)) == 0
    assert client.post("/folder/trash/expunge", data={"ids": [keep]}).status_code == 400   # CSRF


def test_empty_trash_keeps_mail_still_being_sent(client, r) -> None:
    token = log_in_as(client, ALICE)
    inbox = put_message(r, ALICE, simple("stays"))
    trashed = [put_message(r, ALICE, simple(f"t{n}")) for n in range(7)]
    sending = put_message(r, ALICE, simple("out", sender=ALICE, to="x@remote.test"), folder=fields.SENT,
                          flags=(fields.SEEN,), kind="sent")
    r.sadd(keys.outbox(ALICE), sending)   # a delivery still under way (outbound.py's mark)
    mbulk.to_trash(r, ALICE, trashed, only_from=fields.INBOX)
    mbulk.to_trash(r, ALICE, [sending], only_from=fields.SENT)
    used = int(r.hget(keys.info(ALICE), "bytes") or 0)
    sizes = sum(int(r.hget(keys.message(ALICE, i), fields.SIZE) or 0) for i in trashed)
    confirm = client.get("/folder/trash/empty")
    assert confirm.status_code == 200 and "Empty Trash?" in confirm.text
    assert "This deletes all 8 messages in Trash for good." in confirm.text
    assert all(r.exists(keys.message(ALICE, i)) for i in trashed)
    response = client.post("/folder/trash/empty", data={"csrf_token": token})
    assert notice(client.get(response.location).text) == (
        "7 messages deleted for good. 1 message is still being sent, so kept in Trash.")
    assert r.zrange(keys.folder(ALICE, fields.TRASH), 0, -1) == [sending.encode()]
    assert int(r.hget(keys.info(ALICE), "bytes") or 0) == used - sizes
    assert r.exists(keys.message(ALICE, inbox)) and r.exists(keys.message(ALICE, sending))
    assert expunge.tombstones(r, ALICE) == 7
    assert "Trash is already empty." not in client.get("/folder/trash/empty").text
    r.srem(keys.outbox(ALICE), sending)
    client.post("/folder/trash/empty", data={"csrf_token": token})
    assert "Trash is already empty." in client.get("/folder/trash/empty").text
    assert client.post("/folder/trash/empty", data={}).status_code == 400


def test_empty_trash_past_one_batch(r) -> None:
    ids = [put_message(r, ALICE, simple(f"b{n}")) for n in range(12)]
    mbulk.to_trash(r, ALICE, ids, only_from=fields.INBOX)
    done = expunge.empty_trash(r, ALICE, batch=5)
    assert done.deleted == 12 and r.zcard(keys.folder(ALICE, fields.TRASH)) == 0
    assert int(r.hget(keys.info(ALICE), "messages") or 0) == 0


def smtp_send(port: int, source: str, to: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
        s.sendmail("ann@remote.test", [to], simple(subject, to=to))


def test_unread_counts_follow_every_change(client, r, receiver) -> None:
    token = log_in_as(client, ALICE)
    for n in range(6):
        smtp_send(receiver.port, "127.0.0.2" if n % 2 else "127.0.0.3", ALICE, f"in{n}")
    wait_for(lambda: r.zcard(keys.folder(ALICE, fields.INBOX)) == 6, timeout=30, what="6 deliveries")
    ids = [i.decode() for i in r.zrevrange(keys.folder(ALICE, fields.INBOX), 0, -1)]
    sent = put_message(r, ALICE, simple("mine", sender=ALICE, to=BOB), folder=fields.SENT, kind="sent")
    page = client.get("/").text
    assert nav_counts(page) == real_unread(r, ALICE) == {**dict.fromkeys(SHOWN, 0),
                                                         fields.INBOX: 6, fields.SENT: 1}
    client.get(f"/message/{ids[0]}")                                      # read
    post_bulk(client, token, "inbox", "read", ids[1:3])                   # bulk read
    client.post(f"/message/{ids[3]}/delete", data={"csrf_token": token})  # one move, unread
    post_bulk(client, token, "inbox", "delete", [ids[4], ids[1]])         # bulk move, unread + read
    post_bulk(client, token, "trash", "unread", [ids[1]])                 # unread in Trash
    post_bulk(client, token, "sent", "read", [sent])
    counts = nav_counts(client.get("/folder/trash").text)
    assert counts == real_unread(r, ALICE)
    assert counts[fields.INBOX] == 1 and counts[fields.TRASH] == 3 and counts[fields.SENT] == 0
    post_bulk(client, token, "trash", "restore", [ids[4]])
    client.post(f"/message/{ids[0]}/flags", data={"csrf_token": token, "action": "unread"})
    assert nav_counts(client.get("/?q=in").text) == real_unread(r, ALICE)   # the search page too
    client.post("/folder/trash/empty", data={"csrf_token": token})
    smtp_send(receiver.port, "127.0.0.2", ALICE, "late")
    wait_for(lambda: r.zcard(keys.folder(ALICE, fields.INBOX)) == 5, timeout=30, what="the late one")
    counts = nav_counts(client.get("/").text)
    assert counts == real_unread(r, ALICE)
    assert counts == {**dict.fromkeys(SHOWN, 0), fields.INBOX: 4}


def test_unread_count_is_capped_for_display(client, r) -> None:
    log_in_as(client, ALICE)
    key = keys.folder(ALICE, fields.INBOX)
    ids = [new_id() for _ in range(1001)]
    # Index entries only (the list shows what has a record): enough to count past the cap.
    r.zadd(key, {i: n for n, i in enumerate(ids)})
    r.sadd(keys.unseen(ALICE), *ids)
    assert '<span class="count">999+</span>' in client.get("/").text
    r.zrem(key, ids[0])
    r.srem(keys.unseen(ALICE), ids[1])
    assert '<span class="count">999</span>' in client.get("/").text


@pytest.mark.dovecot
def test_deleted_for_good_is_not_appended_and_is_counted(client, r, settings, dovecot, tmp_path: Path,
                                                         capsys) -> None:
    from tests.reconcile_helpers import cli_args, message, put, read_report

    token = log_in_as(client, ALICE)
    s = reconcile_settings(settings, dovecot, tmp_path)
    done_id, done_raw = message(ALICE, "reconciled then deleted")
    put(r, ALICE, done_raw, done_id)
    assert run_engine(s, [ALICE]).ok
    kept_id, kept_raw = message(ALICE, "kept")
    gone_ids = []
    for n in range(3):
        msg_id, raw = message(ALICE, f"never reconciled {n}")
        gone_ids.append(put(r, ALICE, raw, msg_id))
    put(r, ALICE, kept_raw, kept_id)
    post_bulk(client, token, "inbox", "delete", [*gone_ids, done_id])
    assert metrics.reconcile_counts(r)["default"]["done"] == 1
    client.post("/folder/trash/empty", data={"csrf_token": token})
    assert metrics.reconcile_counts(r)["default"]["done"] == 0   # /metrics' reconcile progress follows

    from fallback.cli import main

    report_path = tmp_path / "report.json"
    assert main(cli_args(s, "--user", ALICE, "--report", str(report_path))) == 0
    out = capsys.readouterr().out
    assert re.search(r"deleted for good by the user\s+│?\s*4", out), out
    report = read_report(report_path)
    assert report["totals"]["deleted_for_good"] == 4 and report["totals"]["appended"] == 1
    on_disk = ids_on_disk(dovecot, ALICE)
    assert sorted(on_disk) == sorted([done_id, kept_id])   # the reconciled one stays where it was
    view = MainStoreView(dovecot, ALICE)
    assert {m["raw"] for m in view.messages("INBOX")} == {done_raw, kept_raw}
    view.close()
    assert r.scard(keys.pending(ALICE)) == 0
    again = run_engine(s, [ALICE])
    assert again.ok and again.totals()["deleted_for_good"] == 0   # counted once


# -- in the real Chromium, served by gunicorn ------------------------------------------------------


@pytest.fixture
def webmail(settings, receiver) -> Any:
    with served(settings, status_show_scope=True) as url:
        yield url


@pytest.mark.browser
@pytest.mark.slow
def test_browser_select_mark_delete_and_empty_trash(webmail, receiver, r) -> None:
    from playwright.sync_api import sync_playwright

    from fallback.ops import incident
    from tests.test_web_a11y import check
    from tests.test_web_browser import ARGS, CHROMIUM, DESKTOP, PHONE, log_in, shot

    base = webmail
    for n in range(4):
        smtp_send(receiver.port, "127.0.0.2" if n % 2 else "127.0.0.3", ALICE, f"walk {n}")
    wait_for(lambda: r.zcard(keys.folder(ALICE, fields.INBOX)) == 4, timeout=30, what="4 deliveries")
    incident.set_text(r, "The main system is back at 18:00.", "test")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        # The walk runs under the pages' own CSP (bulk.js must load with its nonce); axe-core
        # needs a second context that lets its script in.
        user = chromium.new_context(viewport=DESKTOP)
        audit_ctx = chromium.new_context(viewport=DESKTOP, bypass_csp=True)
        page, axe = user.new_page(), audit_ctx.new_page()
        refused: list[str] = []
        page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
        log_in(page, base, ALICE)
        log_in(axe, base, ALICE)

        select_all = page.get_by_label("Select all on this page")
        assert select_all.is_visible()   # bulk.js ran
        page.get_by_label("Select message from ann@remote.test: walk 3").check()
        page.get_by_label("Select message from ann@remote.test: walk 2").check()
        assert page.evaluate("document.querySelector('[data-select-all]').indeterminate")
        for size, name in ((DESKTOP, "desktop"), (PHONE, "phone")):
            page.set_viewport_size(size)
            shot(page, f"bulk-folder-{name}")
        page.set_viewport_size(DESKTOP)
        page.get_by_role("button", name="Mark read").click()
        page.wait_for_url(f"{base}/?**")
        assert page.locator("p.notice").inner_text() == "2 messages marked read."
        assert page.locator(".folders .count").first.inner_text() == "2"
        assert real_unread(r, ALICE)[fields.INBOX] == 2
        axe.goto(f"{base}/")
        check(axe, "inbox with bulk actions")

        select_all.check()
        assert page.locator("input[name=ids]:checked").count() == 4
        page.get_by_role("button", name="Delete", exact=True).click()
        page.wait_for_url(f"{base}/?**")
        assert page.locator("p.notice").inner_text() == "4 messages moved to Trash."
        page.get_by_role("link", name=re.compile("^Trash")).click()
        page.wait_for_url(f"{base}/folder/trash")
        assert page.locator("input[name=ids]").count() == 4
        for size, name in ((DESKTOP, "desktop"), (PHONE, "phone")):
            page.set_viewport_size(size)
            shot(page, f"bulk-trash-{name}")
        page.set_viewport_size(DESKTOP)
        axe.goto(f"{base}/folder/trash")
        check(axe, "Trash with bulk actions")
        axe.goto(f"{base}/folder/trash/empty")
        check(axe, "Empty Trash confirmation")

        page.get_by_role("link", name="Empty Trash").click()
        page.wait_for_url(f"{base}/folder/trash/empty")
        assert "This deletes all 4 messages in Trash for good." in page.inner_text("main")
        page.get_by_role("button", name="Delete for good").click()
        page.wait_for_url(f"{base}/folder/trash?**")
        assert page.locator("p.notice").inner_text() == "4 messages deleted for good."
        assert "No messages here yet." in page.inner_text("main")
        assert r.zcard(keys.folder(ALICE, fields.TRASH)) == 0 and expunge.tombstones(r, ALICE) == 4
        live = page.locator(".banner.live").inner_text()
        assert live == "Service update: The main system is back at 18:00."

        axe.goto(f"{base}/status")
        assert "The main system is back at 18:00." in axe.inner_text("main")
        check(axe, "status page with a live incident text")
        assert refused == []
        user.close()
        audit_ctx.close()
        chromium.close()
