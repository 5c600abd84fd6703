"""Undo send (issue 15 item 7) with the real worker and a real smarthost (Postfix's smtp-sink):
an undone message never leaves (no smarthost, no local copy, no forward entry, no Sent copy) and
is back in Drafts with its attachment; a message not undone waits, then arrives once."""

from __future__ import annotations

import email
import email.policy
import io
import json
import re
from dataclasses import replace
from html import unescape

import pytest

from fallback import keys
from fallback.cli import main
from fallback.config import load_settings
from fallback.errors import ConfigError
from fallback.intake import sendlimits
from fallback.mailbox import fields, store
from fallback.ops import failover
from fallback.queues import delayed, outbound
from tests.conftest import add_mailbox
from tests.servers import SmtpSink, sink_payload, wait_for
from tests.test_outbound import WorkerThread
from tests.webutil import field, log_in_as, make_app

ALICE, BOB, DAVE, EXT = "alice@example.com", "bob@example.com", "dave@example.com", "ext@remote.test"
HIDDEN = "hidden@remote.test"
UNDO = 3.0  # seconds: long enough for the steps between Send and Undo on a busy machine


def form_of(page: str) -> dict[str, str]:
    return {name: unescape(field(page, name)) for name in
            ("csrf_token", "draft", "draft_sig", "reply_to", "forward_of", "saved")}


def send(client, form: dict[str, str], subject: str, **extra):
    data = {"to": f"{EXT}, {BOB}, {DAVE}", "cc": "", "bcc": HIDDEN, "subject": subject,
            "body": f"{subject} body", **form, **extra}
    return client.post("/compose", data=data, content_type="multipart/form-data")


def nothing_left_for(r, msg_id: str) -> None:
    assert msg_id not in store.MailboxReader(r, BOB).ids(fields.INBOX)
    assert not r.exists(keys.message(BOB, msg_id))
    assert not r.exists(keys.forward_record(DAVE, msg_id))
    assert not r.exists(keys.message(ALICE, msg_id))
    assert not r.exists(keys.outbound_record(ALICE, msg_id))


@pytest.fixture
def undo_app(r, settings):
    """alice and bob on failed-over store1 (copies here), dave on healthy store2 (forwarded)."""
    for address, mailstore in ((ALICE, "store1"), (BOB, "store1"), (DAVE, "store2")):
        add_mailbox(r, settings, address, mailstore=mailstore)
    failover.start(r, ["store1"])
    return make_app(settings, r, undo_send_seconds=UNDO, send_limit_per_hour=50)


def test_undo_and_send_against_smtp_sink(r, settings, undo_app) -> None:
    sink = SmtpSink().start()
    worker = WorkerThread(replace(settings, smarthost=f"127.0.0.1:{sink.port}", smarthost_tls="none",
                                  retry_base=0.2, retry_max_interval=0.5, claim_timeout=1.0,
                                  smarthost_timeout=10.0))
    try:
        client = undo_app.test_client()
        log_in_as(client, ALICE)
        # Sent, then undone while it waits.
        form = form_of(client.get("/compose").text)
        plan = [(io.BytesIO(b"secret plan"), "plan.txt", "text/plain")]
        resp = send(client, form, "undone", attachments=plan)
        assert resp.status_code == 302 and resp.headers["Location"] == f"/sent/{form['draft']}"
        undone_id = form["draft"]
        page = client.get(resp.headers["Location"]).text
        assert "Your message leaves in" in page and ">Undo</button>" in page
        assert f'action="/sent/{undone_id}/undo"' in page
        assert r.zrange(keys.folder(ALICE, fields.SENT), 0, -1) == [undone_id.encode()]
        assert sendlimits.used(r, ALICE)["hour"] == 4  # counted once, at Send
        assert store.MailboxReader(r, BOB).ids(fields.INBOX) == []  # the local copy waits
        assert not r.exists(keys.forward_record(DAVE, undone_id))  # so does the forward
        assert r.zcard(keys.folder(ALICE, fields.DRAFTS)) == 0
        worker.start()  # from here a worker would take it when due
        back = client.post(f"/sent/{undone_id}/undo", data={"csrf_token": form["csrf_token"]})
        assert back.status_code == 302
        assert re.fullmatch(r"/compose\?draft=[0-9A-Z]{26}&undone=1", back.headers["Location"])
        reopened = client.get(back.headers["Location"]).text
        assert "Sending undone: the message is back in Drafts. Nothing was sent." in reopened
        assert f'value="{HIDDEN}"' in reopened and 'value="undone"' in reopened
        assert re.search(r"<li>attached: plan\.txt \(", reopened)
        nothing_left_for(r, undone_id)
        assert sendlimits.used(r, ALICE)["hour"] == 0  # given back: it never left
        assert r.zcard(keys.folder(ALICE, fields.DRAFTS)) == 1
        # Undo twice: plainly too late (nothing to take back).
        again = client.post(f"/sent/{undone_id}/undo", data={"csrf_token": form["csrf_token"]})
        assert again.status_code == 409
        assert "Too late to undo: this message was already sent." in again.text

        # Sent from the reopened draft and not undone: it waits, then leaves once.
        second = form_of(reopened)
        resp = send(client, second, "kept")
        kept_id = second["draft"]
        assert resp.headers["Location"] == f"/sent/{kept_id}"
        record = r.hgetall(keys.outbound_record(ALICE, kept_id))
        due = float(record[b"notbefore"])
        assert store.MailboxReader(r, BOB).ids(fields.INBOX) == []
        assert r.zcard(keys.folder(ALICE, fields.DRAFTS)) == 0  # sent: out of Drafts
        wait_for(lambda: {st["state"] for st in outbound.recipient_status(r, ALICE, kept_id).values()}
                 == {"delivered"}, timeout=30, what="delivery after the undo time")
        status = outbound.recipient_status(r, ALICE, kept_id)
        assert all(float(st["last"]) >= due for st in status.values())  # never before its time
        wait_for(lambda: len(sink.messages()) >= 1, what="the sink's dump")
        wait_for(lambda: store.MailboxReader(r, BOB).ids(fields.INBOX) != [], what="bob's copy")
        dumps = sink.messages()
        assert len(dumps) == 1  # the undone one never reached the smarthost
        rcpts, body = sink_payload(dumps[0])
        assert sorted(rcpts) == [EXT, HIDDEN] and b"kept body" in body
        got = email.message_from_bytes(body, policy=email.policy.default)
        assert [a.get_content() for a in got.iter_attachments()] == ["secret plan"]
        (bob_copy,) = store.MailboxReader(r, BOB).ids(fields.INBOX)
        assert bob_copy == kept_id
        assert store.MailboxReader(r, BOB).raw(kept_id) == store.MailboxReader(r, ALICE).raw(kept_id)
        forwarded = r.hgetall(keys.forward_record(DAVE, kept_id))
        assert forwarded[b"rcpt"] == DAVE.encode() and b"kept body" in forwarded[b"raw"]
        assert len(r.xrange(keys.forward_stream(DAVE))) == 1
        assert r.hget(keys.message(ALICE, kept_id), fields.LOCAL) == BOB.encode()
        # Undo after it left: plainly refused, the Sent copy stays.
        late = client.post(f"/sent/{kept_id}/undo", data={"csrf_token": form["csrf_token"]})
        assert late.status_code == 409
        assert "Too late to undo: this message was already sent." in late.text
        assert r.exists(keys.message(ALICE, kept_id))
        assert client.get(f"/sent/{kept_id}").headers["Location"] == f"/message/{kept_id}?sent=1"
        # And the undone message, long past its time, still never left.
        nothing_left_for(r, undone_id)
        assert len(sink.messages()) == 1
    finally:
        worker.stop()
        sink.cleanup()


def test_sender_in_its_own_recipients_gets_a_copy_of_its_own(r, settings, undo_app) -> None:
    client = undo_app.test_client()
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    resp = client.post("/compose", data={"to": ALICE, "cc": "", "bcc": "", "subject": "note to self",
                                         "body": "x", **form}, content_type="multipart/form-data")
    assert resp.status_code == 302
    record = r.hgetall(keys.outbound_record(ALICE, form["draft"]))
    plan = json.loads(record[b"later"])
    [(address, mailstore, copy_id)] = plan["local"]
    assert address == ALICE and mailstore == "store1" and copy_id != form["draft"]
    assert store.MailboxReader(r, ALICE).ids(fields.INBOX) == []
    assert delayed.remaining(r, ALICE, form["draft"]) > 0
    got = delayed.undo(r, ALICE, form["draft"])
    assert got is not None and got.form["to"] == ALICE and got.body.startswith(b"From: ")
    assert delayed.undo(r, ALICE, form["draft"]) is None
    assert store.MailboxReader(r, ALICE).ids(fields.SENT) == []


def test_undo_refused_once_a_worker_took_it(r, settings, undo_app) -> None:
    client = undo_app.test_client()
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    assert send(client, form, "taken").status_code == 302
    # What the worker's take does (worker._TAKE): the lease, and the end of the undo time.
    r.set(keys.outbound_lease(ALICE, form["draft"]), "w1", px=5000)
    assert delayed.undo(r, ALICE, form["draft"]) is None
    r.delete(keys.outbound_lease(ALICE, form["draft"]))
    r.hdel(keys.outbound_record(ALICE, form["draft"]), delayed.UNDO)
    resp = client.post(f"/sent/{form['draft']}/undo", data={"csrf_token": form["csrf_token"]})
    assert resp.status_code == 409 and "Too late to undo" in resp.text
    assert r.exists(keys.message(ALICE, form["draft"]))
    # Bad ids: 404; another user's message: not theirs to undo.
    assert client.post("/sent/nonsense/undo", data={"csrf_token": form["csrf_token"]}).status_code == 404
    assert client.get("/sent/nonsense").status_code == 404
    # No CSRF token: 400, nothing undone.
    second = form_of(client.get("/compose").text)
    assert send(client, second, "csrf").status_code == 302
    assert client.post(f"/sent/{second['draft']}/undo", data={}).status_code == 400
    assert delayed.remaining(r, ALICE, second["draft"]) > 0


def test_undo_send_seconds_setting(capsys) -> None:
    assert load_settings({}, env={}).undo_send_seconds == 10
    assert load_settings({}, env={"FALLBACK_UNDO_SEND_SECONDS": "0"}).undo_send_seconds == 0
    assert load_settings({"undo_send_seconds": "300"}, env={}).undo_send_seconds == 300
    with pytest.raises(ConfigError, match=r"^undo_send_seconds: must be 0 \(no undo\) to 300 seconds$"):
        load_settings({"undo_send_seconds": "301"}, env={})
    # The flag of the servers; refused before anything starts, in one line.
    assert main(["web", "--undo-send-seconds", "301"]) == 1
    assert capsys.readouterr().err == "fallback web: undo_send_seconds: must be 0 (no undo) to 300 seconds\n"


def test_held_back_copies_are_made_once_after_a_crash(r, settings, undo_app) -> None:
    """A worker that died after making the copies, before it cleared `later`: the next one
    makes none again (each recipient is marked done in the record)."""
    import asyncio

    from fallback.maillog import MailLog
    from fallback.redisconn import async_client

    client = undo_app.test_client()
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    assert send(client, form, "crash").status_code == 302
    msg_id = form["draft"]
    key = keys.outbound_record(ALICE, msg_id)
    later = r.hget(key, delayed.LATER)
    raw = store.MailboxReader(r, ALICE).raw(msg_id) or b""

    def release() -> None:
        record = {k.decode(): v for k, v in r.hgetall(key).items()}

        async def go() -> None:
            ar = async_client(settings.redis_url or "")
            try:
                await delayed.release(ar, ALICE, msg_id, record, raw, MailLog())
            finally:
                await ar.aclose()

        asyncio.run(go())

    release()
    r.hset(key, delayed.LATER, later)  # as if the worker died before clearing it
    release()
    assert store.MailboxReader(r, BOB).ids(fields.INBOX) == [msg_id]
    assert int(r.hget(keys.info(BOB), "messages")) == 1
    assert len(r.xrange(keys.forward_stream(DAVE))) == 1
    assert not r.hexists(key, delayed.LATER)
