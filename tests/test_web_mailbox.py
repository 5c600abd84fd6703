"""Webmail folders and messages: listing, search, reading, attachments, flags, Trash (test client)."""

from __future__ import annotations

import base64
import json
import re

from fallback import keys
from fallback.ids import new_id
from fallback.mailbox import fields, store
from tests.webutil import csrf, log_in_as, put_message, simple

ALICE, BOB = "alice@example.com", "bob@example.com"

MIXED = (
    b"From: Ann <ann@remote.test>\r\nTo: alice@example.com\r\nCc: bob@example.com\r\n"
    b"Subject: report\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <r1@remote.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
    b"--XX\r\nContent-Type: multipart/related; boundary=YY\r\n\r\n"
    b"--YY\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<p>See <b>chart</b>: <img src=\"cid:chart@x\"> and <img src=\"https://tracker.test/p.gif\"></p>\r\n"
    b"--YY\r\nContent-Type: image/png\r\nContent-ID: <chart@x>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.b64encode(b"\x89PNG fake image bytes") + b"\r\n--YY--\r\n"
    b"--XX\r\nContent-Type: text/html\r\nContent-Disposition: attachment; filename=\"page.html\"\r\n\r\n"
    b"<script>alert(1)</script>\r\n"
    b"--XX--\r\n"
)


def test_inbox_lists_newest_first_with_marks(client, r) -> None:
    log_in_as(client, ALICE)
    old = put_message(r, ALICE, simple("older one", sender="Zed <zed@remote.test>"))
    new = put_message(r, ALICE, MIXED)
    store.set_flags(r, ALICE, old, add=(fields.SEEN,))
    page = client.get("/").text
    assert page.index(new) < page.index(old)
    rows = re.findall(r'<li class="(unread|read)"[^>]*>\s*(?:<label class="pick">.*?</label>\s*)?'
                      r'<a href="/message/(\w+)"[^>]*>(.*?)</a>', page, re.S)
    assert [(c, i) for c, i, _ in rows] == [("unread", new), ("read", old)]
    assert "Ann" in rows[0][2] and "report" in rows[0][2] and "Has attachments" in rows[0][2]
    assert "Zed" in rows[1][2] and "Has attachments" not in rows[1][2]
    assert re.search(r'class="size">\d+ B<', rows[1][2])
    assert '<span class="count">1</span>' in page


def test_pagination(client, r) -> None:
    log_in_as(client, ALICE)
    ids = [put_message(r, ALICE, simple(f"n{n}")) for n in range(120)]
    first = client.get("/").text
    assert "Page 1 of 3" in first and "120 messages" in first and ids[-1] in first
    assert ids[69] not in first
    third = client.get("/?page=3").text
    assert ids[0] in third and ids[-1] not in third and "Newer" in third and "Older" not in third
    assert client.get("/?page=abc").status_code == 200


def test_search_sender_and_subject(client, r) -> None:
    log_in_as(client, ALICE)
    a = put_message(r, ALICE, simple("Quarterly numbers", sender="Finance <fin@corp.test>"))
    b = put_message(r, ALICE, simple("lunch", sender="Pat <pat@remote.test>"))
    page = client.get("/?q=quarterly").text
    assert a in page and b not in page
    page = client.get("/?q=PAT@remote").text
    assert b in page and a not in page
    assert "No messages match." in client.get("/?q=nothing-like-this").text


def test_folders_and_unknown_folder(client, r) -> None:
    log_in_as(client, ALICE)
    sent = put_message(r, ALICE, simple("mine", sender=ALICE, to="Bob <bob@example.com>"),
                       folder=fields.SENT, flags=(fields.SEEN,), kind="sent")
    page = client.get("/folder/sent").text
    assert sent in page and "Bob" in page  # Sent shows the recipient
    assert client.get("/folder/Trash").status_code == 200
    assert client.get("/folder/Junk").status_code == 404
    assert "nothing here" in client.get("/folder/Junk").text


def test_read_message_marks_seen_and_shows_headers(client, r) -> None:
    log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, simple("hi", body="Plain <b>text</b> & more"))
    page = client.get(f"/message/{msg_id}").text
    for text in ("ann@remote.test", "alice@example.com", "Mon 23 Nov 2026, 10:00 UTC", "hi"):
        assert text in page
    assert "Plain &lt;b&gt;text&lt;/b&gt; &amp; more" in page
    assert fields.SEEN in r.hget(keys.message(ALICE, msg_id), "flags").decode()
    assert r.sismember(keys.pending(ALICE), msg_id)
    assert ">Reply<" in page


def test_html_message_in_sandboxed_frame(client, r) -> None:
    log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, MIXED)
    page = client.get(f"/message/{msg_id}").text
    frame = re.search(r"<iframe[^>]*>", page).group(0)
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in frame
    assert "allow-scripts" not in frame and "allow-same-origin" not in frame
    assert "Show remote content" in page
    body = client.get(f"/message/{msg_id}/body")
    csp = body.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "img-src data:;" in csp and "script-src" not in csp
    assert "sandbox" in csp and "frame-ancestors 'self'" in csp
    assert body.headers["X-Frame-Options"] == "SAMEORIGIN"
    # The cid: image comes from the message itself; the remote one is gone.
    expected = base64.b64encode(b"\x89PNG fake image bytes").decode()
    assert f'src="data:image/png;base64,{expected}"' in body.text
    assert "tracker.test" not in body.text
    # Remote content only after the button on the message page (a POST with the CSRF token).
    assert "tracker.test" not in client.get(f"/message/{msg_id}/body?remote=1").text
    assert client.post(f"/message/{msg_id}/remote", data={"csrf_token": csrf(page)}).status_code == 302
    shown = client.get(f"/message/{msg_id}/body")
    assert "https://tracker.test/p.gif" in shown.text
    assert "img-src data: http: https:" in shown.headers["Content-Security-Policy"]
    assert "Show remote content" not in client.get(f"/message/{msg_id}").text


def test_attachment_download_headers(client, r) -> None:
    log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, MIXED)
    page = client.get(f"/message/{msg_id}").text
    link = re.search(r'href="(/message/\w+/part/\d+)">page.html</a>', page).group(1)
    resp = client.get(link)
    assert resp.status_code == 200
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert "page.html" in resp.headers["Content-Disposition"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.data.startswith(b"<script>alert(1)</script>")
    assert "sandbox" in resp.headers["Content-Security-Policy"]
    assert client.get(f"/message/{msg_id}/part/99").status_code == 404


def test_view_source_is_plain_text(client, r) -> None:
    log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, MIXED)
    resp = client.get(f"/message/{msg_id}/source")
    assert resp.mimetype == "text/plain"
    assert resp.data == MIXED
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


MALFORMED = [
    b"Subject: =?utf-8?B?broken\r\nContent-Type: multipart/mixed\r\n\r\nno boundary at all\r\n",
    b"Subject: bad charset\r\nContent-Type: text/plain; charset=x-no-such\r\n\r\ncaf\xe9\r\n",
    b"Subject: b64\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64***\r\n",
    b"\x00\x01\x02 garbage with no headers at all \xff\xfe",
    b"Content-Type: multipart/alternative; boundary=\"a\"\r\n\r\n--a\r\nContent-Type: text/html\r\n\r\n"
    b"<p>unterminated",
]


def test_malformed_mime_shown_as_text_never_an_error(client, r) -> None:
    log_in_as(client, ALICE)
    for raw in MALFORMED:
        msg_id = put_message(r, ALICE, raw)
        assert client.get("/").status_code == 200
        for path in ("", "/source", "/body"):
            resp = client.get(f"/message/{msg_id}{path}")
            assert resp.status_code in (200, 404), (raw, path)
            assert "Something went wrong" not in resp.text
        page = client.get(f"/message/{msg_id}").text
        assert "Reply" in page


def test_another_users_message_is_404_everywhere(client, r) -> None:
    bobs = put_message(r, BOB, MIXED)
    token = log_in_as(client, ALICE)
    for path in ("", "/body", "/source", "/part/0", "/part/3"):
        assert client.get(f"/message/{bobs}{path}").status_code == 404, path
    for path, data in ((f"/message/{bobs}/flags", {"action": "flag"}), (f"/message/{bobs}/delete", {}),
                       (f"/message/{bobs}/restore", {})):
        assert client.post(path, data={**data, "csrf_token": token}).status_code == 404
    assert client.get(f"/compose?reply={bobs}").status_code == 404
    assert client.get(f"/compose?forward={bobs}").status_code == 404
    assert client.get("/message/not-an-id").status_code == 404
    assert client.get(f"/message/{new_id()}").status_code == 404
    # Bob's message is untouched.
    assert (r.hget(keys.message(BOB, bobs), "flags") or b"") == b""  # no flags: no field (issue 17)
    assert r.hget(keys.message(BOB, bobs), "folder") == b"INBOX"


def test_flags_read_unread_flag_unflag(client, r) -> None:
    token = log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, simple())

    def flags() -> list[str]:
        return (r.hget(keys.message(ALICE, msg_id), "flags") or b"").decode().split()

    for action, check in (("read", lambda f: fields.SEEN in f),
                          ("unread", lambda f: fields.SEEN not in f),
                          ("flag", lambda f: fields.FLAGGED in f),
                          ("unflag", lambda f: fields.FLAGGED not in f)):
        r.srem(keys.pending(ALICE), msg_id)
        resp = client.post(f"/message/{msg_id}/flags", data={"action": action, "csrf_token": token})
        assert resp.status_code == 302
        assert check(flags()), action
        assert r.sismember(keys.pending(ALICE), msg_id)  # reconcile will carry it
    assert r.sismember(keys.unseen(ALICE), msg_id) == (fields.SEEN not in flags())
    bad = client.post(f"/message/{msg_id}/flags", data={"action": "explode", "csrf_token": token})
    assert bad.status_code == 400


def test_delete_to_trash_and_restore(client, r) -> None:
    token = log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, simple())
    sent_id = put_message(r, ALICE, simple("s", sender=ALICE), folder=fields.SENT, kind="sent",
                          flags=(fields.SEEN,))
    resp = client.post(f"/message/{msg_id}/delete", data={"csrf_token": token})
    assert resp.headers["Location"] == "/"
    assert r.zscore(keys.folder(ALICE, "Trash"), msg_id) is not None
    assert r.zscore(keys.folder(ALICE, "INBOX"), msg_id) is None
    trash = client.get("/folder/trash").text
    assert msg_id in trash
    assert "Restore" in client.get(f"/message/{msg_id}").text
    client.post(f"/message/{msg_id}/restore", data={"csrf_token": token})
    assert r.zscore(keys.folder(ALICE, "INBOX"), msg_id) is not None
    client.post(f"/message/{sent_id}/delete", data={"csrf_token": token})
    client.post(f"/message/{sent_id}/restore", data={"csrf_token": token})
    assert r.zscore(keys.folder(ALICE, "Sent"), sent_id) is not None  # back where it came from
    assert r.sismember(keys.pending(ALICE), msg_id)


def test_action_redirect_stays_on_this_site(client, r) -> None:
    token = log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, simple())
    for target in ("//evil.test/x", "https://evil.test/", "/\\evil.test"):
        resp = client.post(f"/message/{msg_id}/flags", data={"action": "read", "csrf_token": token,
                                                              "next": target})
        assert resp.headers["Location"] == f"/message/{msg_id}"


def test_sent_view_shows_delivery_state(client, r) -> None:
    log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, simple("out", sender=ALICE, to="x@remote.test"), folder=fields.SENT,
                         kind="sent", flags=(fields.SEEN,))
    r.hset(keys.outbound_record(ALICE, msg_id), mapping={
        "rcpt:x@remote.test": json.dumps({"state": "deferred", "attempts": 2,
                                          "reply": "451 4.7.1 greylisted", "next": 1795000000}),
        "rcpt:y@remote.test": json.dumps({"state": "delivered", "attempts": 1, "reply": "250 ok",
                                          "next": 0}),
        "rcpt:z@remote.test": json.dumps({"state": "failed", "attempts": 1,
                                          "reply": "550 5.1.1 no such user", "next": 0}),
    })
    store.note_local_recipients(r, ALICE, msg_id, [BOB])
    page = client.get(f"/message/{msg_id}").text
    assert re.search(r"x@remote.test</td><td>\s*Waiting to retry \(next attempt "
                     r"<time datetime=\"2026-11-18T[^>]+>\w{3} 18 Nov 2026, [\d:]+ UTC</time>\): "
                     r"451 4.7.1 greylisted", page)
    assert re.search(r"y@remote.test</td><td>\s*Delivered", page)
    assert re.search(r"z@remote.test</td><td>\s*Failed: 550 5.1.1 no such user", page)
    assert re.search(r"bob@example.com</td><td>\s*Delivered", page)
