"""Compose never loses or half-sends a message: characters a header cannot carry, and the once-guard.

Every character that would end a header line or that a header cannot carry is
refused in every field the form sets, with a page naming the field and the
character, the form kept as typed and nothing queued; the same form, corrected,
then sends once and reaches a real smarthost (Postfix's smtp-sink) once.
"""

from __future__ import annotations

import email
import email.policy
import io
import threading

import pytest
import redis
from markupsafe import escape

from fallback import keys
from fallback.mailbox import store
from fallback.queues import outbound
from tests import test_outbound as ob
from tests.servers import sink_payload, wait_for
from tests.test_web_compose import compose_page, stream_entries
from tests.webutil import log_in_as, put_message
from web.sessions import COOKIE

out_settings, sinks, workers = ob.out_settings, ob.sinks, ob.workers  # the fixtures, shared

ALICE, BOB = "alice@example.com", "bob@example.com"

# The character, and how the page names it.
BAD = {
    "\x00": "NUL U+0000", "\n": "line feed U+000A", "\r": "carriage return U+000D",
    "\x0b": "vertical tab U+000B", "\x0c": "form feed U+000C", "\x1c": "file separator U+001C",
    "\x1d": "group separator U+001D", "\x1e": "record separator U+001E",
    "\x85": "next line U+0085", "\u2028": "line separator U+2028",
    "\u2029": "paragraph separator U+2029", "\x01": "control character U+0001",
    "\x1b": "control character U+001B", "\x7f": "delete U+007F", "\x9b": "control character U+009B",
}
GOOD = {"to": "Ann Example <x@remote.test>", "cc": "c@remote.test", "bcc": "b@remote.test",
        "subject": "Quarterly plan", "body": "The body stays as typed."}
# field -> (how the page names it, the value with the character put in at {c})
FIELDS = {
    "to": ("The To field", "Ann{c}Example <x@remote.test>"),
    "cc": ("The Cc field", "c@remote.test{c}"),
    "bcc": ("The Bcc field", "{c}b@remote.test"),
    "subject": ("The subject", "Quarterly{c}plan"),
}


def post(client, form: dict[str, str], **values):
    data = {**form, **GOOD, **values}
    return client.post("/compose", data=data, content_type="multipart/form-data")


def nothing_queued(r) -> None:
    assert r.zcard(keys.folder(ALICE, "Sent")) == 0
    assert stream_entries(r) == []
    assert r.zcard(keys.send_log(ALICE)) == 0
    assert not list(r.scan_iter(f"{keys.mbx(ALICE)}:sending:*"))  # the once-guard is not set
    assert r.zcard(keys.folder(BOB, "INBOX")) == 0


def sent_once(r, resp, draft: str, worker: bool = False) -> None:
    assert resp.status_code == 302 and resp.headers["Location"] == f"/message/{draft}?sent=1"
    assert r.zrange(keys.folder(ALICE, "Sent"), 0, -1) == [draft.encode()]
    assert outbound.recipient_status(r, ALICE, draft)
    if not worker:  # a running worker takes the entry off the stream at once
        assert stream_entries(r) == [{"a": ALICE, "id": draft}]


@pytest.mark.parametrize("char", list(BAD), ids=[n.split()[-1] for n in BAD.values()])
@pytest.mark.parametrize("name", list(FIELDS))
def test_unsendable_character_refused_then_corrected_form_sends(client, r, name, char) -> None:
    log_in_as(client, ALICE)
    form = compose_page(client)
    label, template = FIELDS[name]
    bad = template.format(c=char)
    resp = post(client, form, **{name: bad})
    assert resp.status_code == 400
    assert (f"{label} contains a character that cannot be sent ({BAD[char]}). Remove it and try "
            "again. Nothing was sent.") in resp.text
    for field_name, value in {**GOOD, name: bad}.items():
        if field_name != name or char not in "\r\n":  # an HTML attribute keeps no line end anyway
            assert str(escape(value)) in resp.text, field_name  # the form as typed
    assert f'name="draft" value="{form["draft"]}"' in resp.text  # the same once-token
    nothing_queued(r)
    # The corrected form, same once-token: sent normally, once.
    sent_once(r, post(client, form), form["draft"])
    again = post(client, form)
    assert again.headers["Location"].endswith("sent=again")
    assert len(stream_entries(r)) == 1


def test_attachment_name_with_unsendable_character(client, r) -> None:
    log_in_as(client, ALICE)
    form = compose_page(client)
    resp = post(client, form, attachments=[(io.BytesIO(b"%PDF-1.4"), "re\u2028port.pdf")])
    assert resp.status_code == 400
    assert str(escape(
        "The attachment's name contains a character that cannot be sent (line separator U+2028). "
        "Remove it and try again. Nothing was sent. Attach your files again: a browser cannot "
        "keep them.")) in resp.text
    nothing_queued(r)
    sent_once(r, post(client, form, attachments=[(io.BytesIO(b"%PDF-1.4"), "report.pdf")]),
              form["draft"])


@pytest.mark.parametrize("name", list(FIELDS))
def test_corrected_form_reaches_the_smarthost_once(client, r, sinks, workers, name) -> None:
    sink = sinks()
    workers(smarthost=ob.smarthost(sink.port))
    log_in_as(client, ALICE)
    form = compose_page(client)
    label, template = FIELDS[name]
    for char in BAD:
        resp = post(client, form, **{name: template.format(c=char)})
        assert resp.status_code == 400 and label in resp.text
    nothing_queued(r)
    sent_once(r, post(client, form), form["draft"], worker=True)
    wait_for(lambda: set(ob.states(r, form["draft"]).values()) == {"delivered"}, what="delivery")
    (dump,) = sink.messages()
    rcpts, body = sink_payload(dump)
    assert sorted(rcpts) == ["b@remote.test", "c@remote.test", "x@remote.test"]
    sent = store.MailboxReader(r, ALICE).raw(form["draft"])
    assert sent is not None and body == sent.replace(b"\r\n", b"\n")
    assert post(client, form).headers["Location"].endswith("sent=again")
    assert len(sink.messages()) == 1


@pytest.mark.parametrize("text", [
    "first line\u2028still the first\u2029and a paragraph\nsecond line\n",
    "NUL\x00, vertical tab\x0b, form feed\x0c, escape\x1b, NEL\x85, separators\x1c\x1d\x1e end\n",
], ids=["separators", "controls"])
def test_body_with_separators_and_controls_arrives_intact(client, r, sinks, workers, text) -> None:
    sink = sinks()
    workers(smarthost=ob.smarthost(sink.port))
    log_in_as(client, ALICE)
    form = compose_page(client)
    sent_once(r, post(client, form, body=text), form["draft"], worker=True)
    wait_for(lambda: ob.states(r, form["draft"]) != {} and set(
        ob.states(r, form["draft"]).values()) == {"delivered"}, what="delivery")
    (dump,) = sink.messages()
    _, wire = sink_payload(dump)
    assert b"\x00" not in wire  # SMTP may not carry NUL (RFC 5321 4.1.4): encoded, not dropped
    msg = email.message_from_bytes(wire, policy=email.policy.default)
    got = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert got.replace("\r\n", "\n") == text


def test_reply_to_a_message_with_broken_message_ids_still_sends(client, r) -> None:
    original = put_message(r, ALICE, (
        b"From: Mallory <m@remote.test>\r\nTo: alice@example.com\r\nSubject: ids\r\n"
        b"Message-ID: <bad\xe2\x80\xa8id@remote.test>\r\n"
        b"References: <ok1@remote.test> <x\x0bx@remote.test> junk <ok2@remote.test>\r\n"
        b"\r\nbody\r\n"))
    log_in_as(client, ALICE)
    form = compose_page(client, f"?reply={original}")
    resp = post(client, form, to="m@remote.test", cc="", bcc="", subject="Re: ids", body="ok")
    sent_once(r, resp, form["draft"])
    sent = store.MailboxReader(r, ALICE).raw(form["draft"]) or b""
    msg = email.message_from_bytes(sent, policy=email.policy.default)
    assert msg["In-Reply-To"] is None  # the original's id cannot be carried: left out, not refused
    assert msg["References"] == "<ok1@remote.test> <ok2@remote.test>"


def test_forward_of_an_attachment_with_an_unsendable_name(client, r) -> None:
    original = put_message(r, ALICE, (
        b"From: m@remote.test\r\nTo: alice@example.com\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
        b"see file\r\n--b\r\nContent-Type: text/plain\r\n"
        b'Content-Disposition: attachment; filename="a\xe2\x80\xa8b.txt"\r\n\r\nfile body\r\n--b--\r\n'))
    log_in_as(client, ALICE)
    form = compose_page(client, f"?forward={original}")
    resp = post(client, form, to="x@remote.test", cc="", bcc="", subject="Fwd: files", body="fyi")
    sent_once(r, resp, form["draft"])
    sent = store.MailboxReader(r, ALICE).raw(form["draft"]) or b""
    msg = email.message_from_bytes(sent, policy=email.policy.default)
    (att,) = list(msg.iter_attachments())  # type: ignore[attr-defined]
    assert att.get_filename() == "a b.txt" and att.get_content().strip() == "file body"


def test_failure_before_queueing_leaves_the_form_sendable(client, r, monkeypatch) -> None:
    """Redis failing at the queue write: a 503 page, nothing filed, the guard and the send count
    given back, and the same form then sends once."""
    real = outbound.submit
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("injected: connection lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(outbound, "submit", failing)
    log_in_as(client, ALICE)
    form = compose_page(client)
    resp = post(client, form)
    assert resp.status_code == 503 and "Nothing was lost" in resp.text
    nothing_queued(r)
    sent_once(r, post(client, form), form["draft"])
    assert r.zcard(keys.send_log(ALICE)) == 1


def test_double_submit_at_the_same_moment_sends_once(web_app, r) -> None:
    first = web_app.test_client()
    log_in_as(first, ALICE)
    form = compose_page(first)
    cookie = first.get_cookie(COOKIE)
    assert cookie is not None
    second = web_app.test_client()
    second.set_cookie(COOKIE, cookie.value)  # the same session, a second browser tab
    barrier = threading.Barrier(2, timeout=10)
    results: list[str] = []

    def submit(c) -> None:
        barrier.wait()
        results.append(post(c, form).headers["Location"])

    threads = [threading.Thread(target=submit, args=(c,)) for c in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([f"/message/{form['draft']}?sent=1",
                                      f"/message/{form['draft']}?sent=again"])
    assert stream_entries(r) == [{"a": ALICE, "id": form["draft"]}]
