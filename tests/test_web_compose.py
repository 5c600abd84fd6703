"""Webmail compose, reply, reply-all, forward: what is stored, queued and delivered (test client)."""

from __future__ import annotations

import email
import email.policy
import io
import re

from fallback import keys
from fallback.mailbox import delivery, fields, store
from fallback.queues import outbound
from tests.webutil import field, log_in_as, make_app, put_message, simple

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.org"


def compose_page(client, query: str = "") -> dict[str, str]:
    page = client.get(f"/compose{query}").text
    return {name: field(page, name) for name in ("csrf_token", "draft", "draft_sig", "reply_to",
                                                 "forward_of")}


def send(client, query: str = "", **values):
    form = compose_page(client, query)
    data = {"to": "", "cc": "", "bcc": "", "subject": "", "body": "", **form, **values}
    return client.post("/compose", data=data, content_type="multipart/form-data"), form["draft"]


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def stream_entries(r) -> list[dict]:
    out = []
    for n in range(keys.OUTBOUND_SHARDS):
        for _, entry in r.xrange(keys.outbound_stream_n(n)):
            out.append({k.decode(): v.decode() for k, v in entry.items()})
    return out


def test_compose_form_field_names_and_first_submit_button(client) -> None:
    log_in_as(client, ALICE)
    page = client.get("/compose").text
    form = re.search(r'<form class="compose".*?</form>', page, re.S).group(0)
    for name in ("to", "cc", "bcc", "subject", "body", "attachments"):
        assert f'name="{name}"' in form
    assert 'enctype="multipart/form-data"' in form
    assert re.findall(r'<button[^>]*type="submit"[^>]*>([^<]*)<', form)[0] == "Send"


def test_send_to_local_and_remote(client, r) -> None:
    log_in_as(client, ALICE)
    resp, msg_id = send(client, to="Bob <bob@example.com>, x@remote.test", cc=CAROL,
                        bcc="hidden@remote.test", subject="Plans für morgen",
                        body="Hello\nsecond line",
                        attachments=[(io.BytesIO(b"col1,col2\n1,2\n"), "data.csv", "text/csv")])
    assert resp.status_code == 302 and resp.headers["Location"] == f"/message/{msg_id}?sent=1"
    # One Sent copy, queued for the remote recipients only (Bcc included, never in the headers).
    assert r.zrange(keys.folder(ALICE, "Sent"), 0, -1) == [msg_id.encode()]
    raw = store.MailboxReader(r, ALICE).raw(msg_id)
    assert raw.startswith(b"Received: from webmail")
    assert f"id {msg_id}".encode() in raw.split(b"\r\n\r\n")[0]
    msg = parsed(raw)
    assert msg["From"] == ALICE
    assert msg["Subject"] == "Plans für morgen"
    assert "Bob <bob@example.com>" in msg["To"] and "x@remote.test" in msg["To"]
    assert msg["Cc"] == CAROL and msg["Bcc"] is None and b"hidden@remote.test" not in raw
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == "Hello\nsecond line\n"
    (att,) = list(msg.iter_attachments())
    assert att.get_filename() == "data.csv" and att.get_content() == "col1,col2\n1,2\n"
    assert stream_entries(r) == [{"a": ALICE, "id": msg_id}]
    states = outbound.recipient_status(r, ALICE, msg_id)
    assert sorted(states) == ["hidden@remote.test", "x@remote.test"]
    # Local recipients have it in their inbox at once, byte for byte.
    for who in (BOB, CAROL):
        (got,) = r.zrange(keys.folder(who, "INBOX"), 0, -1)
        assert got == msg_id.encode()
        assert store.MailboxReader(r, who).raw(msg_id) == raw
    page = client.get(resp.headers["Location"]).text
    assert "Your message was sent." in page and "Queued for delivery" in page


def test_all_local_still_files_one_sent_copy(client, r) -> None:
    log_in_as(client, ALICE)
    resp, msg_id = send(client, to=BOB, subject="local", body="x")
    assert resp.status_code == 302
    assert r.zcard(keys.folder(ALICE, "Sent")) == 1
    assert stream_entries(r) == []
    assert r.hget(keys.message(ALICE, msg_id), "local") == BOB.encode()
    assert fields.SEEN in r.hget(keys.message(ALICE, msg_id), "flags").decode()


def test_send_to_self_gets_inbox_copy_with_its_own_id(client, r) -> None:
    log_in_as(client, ALICE)
    _, msg_id = send(client, to=ALICE, subject="note to self", body="x")
    (inbox_id,) = [i.decode() for i in r.zrange(keys.folder(ALICE, "INBOX"), 0, -1)]
    assert r.zrange(keys.folder(ALICE, "Sent"), 0, -1) == [msg_id.encode()]
    assert inbox_id != msg_id
    inbox_raw = store.MailboxReader(r, ALICE).raw(inbox_id)
    assert f"id {inbox_id}".encode() in inbox_raw.split(b"\r\n\r\n")[0]
    assert r.hget(keys.message(ALICE, msg_id), "folder") == b"Sent"


def test_resubmitted_form_is_sent_once(client, r) -> None:
    log_in_as(client, ALICE)
    form = compose_page(client)
    data = {**form, "to": "x@remote.test", "cc": "", "bcc": "", "subject": "once", "body": "b"}
    first = client.post("/compose", data=dict(data))
    second = client.post("/compose", data=dict(data))
    assert first.headers["Location"].endswith("sent=1")
    assert second.headers["Location"].endswith("sent=again")
    assert r.zcard(keys.folder(ALICE, "Sent")) == 1
    assert len(stream_entries(r)) == 1
    assert "already been sent" in client.get(second.headers["Location"]).text


def test_forged_draft_id_refused(client, r) -> None:
    log_in_as(client, ALICE)
    bob_msg = put_message(r, BOB, simple())
    form = compose_page(client)
    data = {**form, "draft": bob_msg, "to": BOB, "cc": "", "bcc": "", "subject": "s", "body": "keep me"}
    resp = client.post("/compose", data=data)
    assert resp.status_code == 400 and "out of date" in resp.text and "keep me" in resp.text
    assert (store.MailboxReader(r, BOB).meta(bob_msg) or {})[fields.SUBJECT] == "hello"
    assert r.zcard(keys.folder(ALICE, "Sent")) == 0


def assert_form_error(resp, message: str, r, kept: dict[str, str]) -> None:
    assert resp.status_code == 400
    assert message in resp.text and "Nothing was sent." in resp.text
    for value in kept.values():
        assert value in resp.text  # what the user typed is still there
    assert r.zcard(keys.folder(ALICE, "Sent")) == 0
    assert stream_entries(r) == []
    for who in (BOB, CAROL):
        assert r.zcard(keys.folder(who, "INBOX")) == 0


def test_crlf_in_headers_refused(client, r) -> None:
    log_in_as(client, ALICE)
    cases = {
        "to": ("bob@example.com\r\nBcc: victim@remote.test",
               "The To field contains a character that cannot be sent (carriage return U+000D)."),
        "cc": ("carol@example.org\nX-Evil: 1",
               "The Cc field contains a character that cannot be sent (line feed U+000A)."),
        "bcc": ("a@remote.test\rX: y",
                "The Bcc field contains a character that cannot be sent (carriage return U+000D)."),
        "subject": ("Hi\r\nBcc: victim@remote.test",
                    "The subject contains a character that cannot be sent (carriage return U+000D)."),
    }
    for name, (value, message) in cases.items():
        values = {"to": BOB, "subject": "s", "body": "my long text", name: value}
        resp, _ = send(client, **values)
        assert_form_error(resp, message, r, {"body": "my long text"})


def test_bad_address_and_no_recipient(client, r) -> None:
    log_in_as(client, ALICE)
    resp, _ = send(client, to="bob@example.com, not-an-address", subject="subj", body="text body")
    assert_form_error(resp, "To: &#39;not-an-address&#39; is not an email address.", r,
                      {"subject": "subj", "body": "text body"})
    resp, _ = send(client, subject="subj", body="text body")
    assert_form_error(resp, "Add at least one recipient", r, {"body": "text body"})


def test_attachment_size_limit(settings, r, mailboxes) -> None:
    app = make_app(settings, r, max_upload_size=1024)
    client = app.test_client()
    log_in_as(client, ALICE)
    resp, _ = send(client, to=BOB, subject="big", body="the text",
                   attachments=[(io.BytesIO(b"x" * 800), "a.bin"), (io.BytesIO(b"y" * 800), "b.bin")])
    assert_form_error(resp, "The attachments are too big: at most", r, {"body": "the text"})
    # Far over the limit: the request itself is refused with a clear page.
    resp, _ = send(client, to=BOB, subject="huge", body="t",
                   attachments=[(io.BytesIO(b"z" * (3 * 1024 * 1024)), "c.bin")])
    assert resp.status_code == 413 and "too big to send" in resp.text and "Nothing was sent" in resp.text
    assert r.zcard(keys.folder(ALICE, "Sent")) == 0


def test_from_is_always_the_logged_in_user(client, r) -> None:
    log_in_as(client, ALICE)
    _, msg_id = send(client, to=BOB, subject="s", body="b", **{"from": "ceo@example.com"})
    raw = store.MailboxReader(r, ALICE).raw(msg_id)
    assert parsed(raw)["From"] == ALICE and b"ceo@" not in raw


def test_reply_sets_threading_headers_and_answered(client, r) -> None:
    original = put_message(r, ALICE, simple("Budget", sender="Bob <bob@example.com>",
                                            body="Line one\nLine two",
                                            extra="References: <older@remote.test>\r\n"))
    log_in_as(client, ALICE)
    page = client.get(f"/compose?reply={original}").text
    assert 'value="bob@example.com"' in page and 'value="Re: Budget"' in page
    assert "&gt; Line one\n&gt; Line two" in page and "Bob &lt;bob@example.com&gt; wrote:" in page
    resp, msg_id = send(client, f"?reply={original}", to=BOB, subject="Re: Budget", body="ok")
    assert resp.status_code == 302
    msg = parsed(store.MailboxReader(r, ALICE).raw(msg_id))
    assert msg["In-Reply-To"] == "<Budget@remote.test>"
    assert msg["References"] == "<older@remote.test> <Budget@remote.test>"
    assert fields.ANSWERED in r.hget(keys.message(ALICE, original), "flags").decode()
    assert r.sismember(keys.pending(ALICE), original)
    (bob_copy,) = r.zrange(keys.folder(BOB, "INBOX"), 0, -1)
    assert bob_copy == msg_id.encode()


def test_reply_all_recipients(client, r) -> None:
    original = put_message(r, ALICE, simple("Team", sender="x@remote.test",
                                            to="alice@example.com, bob@example.com",
                                            extra="Cc: carol@example.org, y@remote.test\r\n"))
    log_in_as(client, ALICE)
    page = client.get(f"/compose?reply={original}&all=1").text
    assert field(page, "to") == "x@remote.test"
    assert field(page, "cc") == "bob@example.com, carol@example.org, y@remote.test"
    page = client.get(f"/compose?reply={original}").text
    assert field(page, "cc") == ""


def test_forward_carries_attachments_and_sets_forwarded(client, r) -> None:
    from tests.test_web_mailbox import MIXED

    original = put_message(r, ALICE, MIXED)
    log_in_as(client, ALICE)
    page = client.get(f"/compose?forward={original}").text
    assert 'value="Fwd: report"' in page and "Forwarded message" in page and "page.html" in page
    resp, msg_id = send(client, f"?forward={original}", to="x@remote.test", subject="Fwd: report",
                        body="see below")
    assert resp.status_code == 302
    msg = parsed(store.MailboxReader(r, ALICE).raw(msg_id))
    names = [a.get_filename() for a in msg.iter_attachments()]
    assert "page.html" in names
    assert fields.FORWARDED in r.hget(keys.message(ALICE, original), "flags").decode()


def test_compose_links_from_message_page(client, r) -> None:
    msg_id = put_message(r, ALICE, simple())
    log_in_as(client, ALICE)
    page = client.get(f"/message/{msg_id}").text
    assert f'href="/compose?reply={msg_id}" data-key-reply>Reply</a>' in page
    assert f"/compose?reply={msg_id}&amp;all=1" in page and f"/compose?forward={msg_id}" in page


def test_local_delivery_failure_is_reported_and_sent_copy_kept(client, r, monkeypatch) -> None:
    """A local mailbox unreachable after Sent is filed: the user is told, Sent keeps the message."""
    import redis as redis_lib

    real = delivery.deliver

    def failing(rr, deliveries, msg_id, raw, meta=None):
        if deliveries[0].address == BOB:
            raise redis_lib.ConnectionError("injected: connection lost")
        return real(rr, deliveries, msg_id, raw, meta)

    monkeypatch.setattr(delivery, "deliver", failing)
    log_in_as(client, ALICE)
    resp, msg_id = send(client, to=f"{BOB}, {CAROL}", subject="s", body="b")
    assert resp.headers["Location"].endswith("sent=partial")
    assert r.zcard(keys.folder(ALICE, "Sent")) == 1
    assert r.zcard(keys.folder(CAROL, "INBOX")) == 1 and r.zcard(keys.folder(BOB, "INBOX")) == 0
    page = client.get(resp.headers["Location"]).text
    assert "could not be reached right now" in page
    assert "bob@example.com" not in r.hget(keys.message(ALICE, msg_id), "local").decode()


def test_reply_to_own_sent_message_goes_to_its_recipients(client, r) -> None:
    sent = put_message(r, ALICE, simple("Plan", sender=ALICE, to="x@remote.test, bob@example.com"),
                       folder=fields.SENT, kind="sent", flags=(fields.SEEN,))
    log_in_as(client, ALICE)
    assert field(client.get(f"/compose?reply={sent}").text, "to") == "x@remote.test, bob@example.com"


def test_session_ended_while_composing(client, r) -> None:
    log_in_as(client, ALICE)
    form = compose_page(client)
    r.delete(*r.scan_iter("websess:*"))  # the idle timeout ran out while the user was typing
    resp = client.post("/compose", data={**form, "to": BOB, "cc": "", "bcc": "", "subject": "s",
                                         "body": "long text"})
    assert resp.status_code == 400
    assert "nothing was done" in resp.text and "Back button" in resp.text
    assert r.zcard(keys.folder(ALICE, "Sent")) == 0 and r.zcard(keys.folder(BOB, "INBOX")) == 0
