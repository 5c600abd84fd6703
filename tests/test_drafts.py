"""Drafts on the server (issue 15 item 1): saved, updated in place, reopened, kept through form
errors, logouts and restarts, deleted when sent, and reconciled into the main store's \\Drafts."""

from __future__ import annotations

import email
import email.policy
import io
import re
from html import unescape
from pathlib import Path

import pytest
from markupsafe import escape

from fallback import keys
from fallback.cli import main
from fallback.mailbox import fields, store
from fallback.reconcile.imap import decode_mailbox
from tests.dovecot import MainStoreView
from tests.reconcile_helpers import cli_args, ids_on_disk, read_report, reconcile_settings, run_engine
from tests.webutil import field, log_in_as, make_app

ALICE, BOB = "alice@example.com", "bob@example.com"


def form_of(page: str) -> dict[str, str]:
    return {name: unescape(field(page, name)) for name in
            ("csrf_token", "draft", "draft_sig", "reply_to", "forward_of", "saved")}


def post(client, form: dict[str, str], url: str = "/compose", **values):
    data = {"to": "", "cc": "", "bcc": "", "subject": "", "body": "", **form, **values}
    return client.post(url, data=data, content_type="multipart/form-data")


def drafts_of(r, address: str) -> list[str]:
    return [i.decode() for i in r.zrange(keys.folder(address, fields.DRAFTS), 0, -1)]


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def attached(page: str) -> list[str]:
    return [unescape(m) for m in re.findall(r"<li>attached: ([^<]*?) <label>", page)]


def test_save_update_open_list_and_delete_on_send(client, r) -> None:
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    assert form["saved"] == ""
    resp = post(client, form, action="save", to="Bob <bob@example.com>", bcc="hidden@remote.test",
                subject="Plans", body="first words",
                attachments=[(io.BytesIO(b"a,b\n1,2\n"), "data.csv", "text/csv")])
    assert resp.status_code == 200
    assert "Draft saved." in resp.text
    assert attached(resp.text) == ["data.csv (8 B)"]
    (draft_id,) = drafts_of(r, ALICE)
    assert field(resp.text, "saved") == draft_id and draft_id != form["draft"]
    meta, raw = store.MailboxReader(r, ALICE).message(draft_id)  # type: ignore[misc]
    assert meta["kind"] == "draft" and meta["folder"] == fields.DRAFTS
    assert set(meta["flags"].split()) == {fields.SEEN, fields.DRAFT}
    assert raw.startswith(b"Received: from webmail") and f"id {draft_id}".encode() in raw[:300]
    msg = parsed(raw)
    assert msg["Subject"] == "Plans" and "bob@example.com" in msg["To"] and msg["Bcc"] is None
    assert b"hidden@remote.test" not in raw
    assert [a.get_filename() for a in msg.iter_attachments()] == ["data.csv"]
    assert int(r.hget(keys.info(ALICE), "bytes")) == len(raw)  # counted like any webmail write

    # The autosave (JSON) updates the same draft in place and keeps the attachment.
    saved = form_of(resp.text)
    got = post(client, saved, url="/compose/draft", to="bob@example.com", bcc="hidden@remote.test",
               subject="Plans v2", body="more words")
    assert got.status_code == 200 and got.json["id"] == draft_id and got.json["saved_at"].endswith("UTC")
    assert drafts_of(r, ALICE) == [draft_id]
    raw2 = store.MailboxReader(r, ALICE).raw(draft_id)
    assert parsed(raw2)["Subject"] == "Plans v2"
    assert [a.get_filename() for a in parsed(raw2).iter_attachments()] == ["data.csv"]
    assert int(r.hget(keys.info(ALICE), "bytes")) == len(raw2)
    assert int(r.hget(keys.info(ALICE), "messages")) == 1

    # Listed in Drafts, opening back into compose with every field and the attachment.
    listing = client.get("/folder/drafts").text
    assert f'href="/compose?draft={draft_id}"' in listing and "Plans v2" in listing
    page = client.get(f"/compose?draft={draft_id}").text
    opened = form_of(page)
    assert opened["saved"] == draft_id and opened["draft"] not in (form["draft"], "")
    assert 'value="bob@example.com"' in page and 'value="hidden@remote.test"' in page
    assert 'value="Plans v2"' in page and "more words</textarea>" in page
    assert attached(page)[0].startswith("data.csv (")

    # Sent from there: it leaves Drafts, the Sent copy carries the attachment.
    sent = post(client, opened, to="bob@example.com", subject="Plans v2", body="more words")
    assert sent.status_code == 302, sent.text
    assert drafts_of(r, ALICE) == []
    assert not r.exists(keys.message(ALICE, draft_id))
    raw_sent = store.MailboxReader(r, ALICE).raw(opened["draft"])
    assert [a.get_filename() for a in parsed(raw_sent).iter_attachments()] == ["data.csv"]
    assert client.get(f"/compose?draft={draft_id}").status_code == 404
    # A late autosave of the sent form does not bring the draft back.
    late = post(client, {**opened, "saved": draft_id}, url="/compose/draft", subject="x")
    assert late.status_code == 404 and drafts_of(r, ALICE) == []
    late = post(client, {**opened, "saved": ""}, url="/compose/draft", subject="x")
    assert late.status_code == 409 and late.json["error"] == "This message was sent; it is no longer a draft."
    assert drafts_of(r, ALICE) == []


def test_form_error_keeps_attachments_and_remove(client, r) -> None:
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    resp = post(client, form, to="not an address", subject="Report", body="see attached",
                attachments=[(io.BytesIO(b"%PDF-1.4 one"), "one.pdf", "application/pdf"),
                             (io.BytesIO(b"two two"), "two.txt", "text/plain")])
    assert resp.status_code == 400
    assert str(escape("To: 'not an address' is not an email address. Nothing was sent.")) in resp.text
    assert "Attach your files again" not in resp.text
    assert [a.split(" (")[0] for a in attached(resp.text)] == ["one.pdf", "two.txt"]
    assert r.zcard(keys.folder(ALICE, fields.SENT)) == 0
    assert 'value="not an address"' in resp.text  # kept as typed
    again = form_of(resp.text)
    # Remove two.txt, fix the address: sent with one.pdf, which was never chosen again.
    boxes = dict(re.findall(r'name="remove" value="([0-9a-f]{16})" aria-label="remove ([^"]+)"', resp.text))
    remove = next(d for d, name in boxes.items() if name == "two.txt")
    data = {"to": "bob@example.com", "cc": "", "bcc": "", "subject": "Report", "body": "see attached",
            **again, "remove": remove}
    sent = client.post("/compose", data=data, content_type="multipart/form-data")
    assert sent.status_code == 302, sent.text
    raw = store.MailboxReader(r, ALICE).raw(again["draft"])
    msg = parsed(raw)
    assert [a.get_filename() for a in msg.iter_attachments()] == ["one.pdf"]
    assert next(msg.iter_attachments()).get_content() == b"%PDF-1.4 one"
    assert drafts_of(r, ALICE) == []


def test_drafts_survive_logout_and_restart(client, r, settings) -> None:
    token = log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    resp = post(client, form, url="/compose/draft", to="bob@example.com", subject="Long outage",
                body="typed before lunch")
    draft_id = resp.json["id"]
    assert client.post("/logout", data={"csrf_token": token}).status_code in (302, 303)
    assert client.get(f"/compose?draft={draft_id}").status_code in (302, 303)  # to the login page
    # A new app (a restart of the webmail), a new session: still there.
    fresh = make_app(settings, r).test_client()
    log_in_as(fresh, ALICE)
    assert draft_id in fresh.get("/folder/drafts").text
    page = fresh.get(f"/compose?draft={draft_id}").text
    assert "typed before lunch</textarea>" in page and 'value="Long outage"' in page


def test_bad_inputs(settings, r, mailboxes) -> None:
    limit = 4096
    app = make_app(settings, r, max_upload_size=limit)
    alice, bob = app.test_client(), app.test_client()
    log_in_as(alice, ALICE)
    log_in_as(bob, BOB)
    form = form_of(alice.get("/compose").text)
    # At the limit: kept.
    resp = post(alice, form, action="save", subject="sizes", body="text",
                attachments=[(io.BytesIO(b"x" * limit), "exact.bin", "application/octet-stream")])
    assert resp.status_code == 200 and attached(resp.text)[0].startswith("exact.bin (")
    saved = form_of(resp.text)
    # Past the limit: refused with its message; the text typed and the kept file stay.
    resp = post(alice, saved, subject="sizes", body="text, more", to="bob@example.com",
                attachments=[(io.BytesIO(b"y"), "one-more.bin", "application/octet-stream")])
    assert resp.status_code == 400
    assert ("The attachments are too big: at most 4 KB in total. Attach smaller files. Nothing was "
            "sent. Attach your files again: a browser cannot keep them.") in unescape(resp.text)
    assert [a.split(" (")[0] for a in attached(resp.text)] == ["exact.bin"]
    (draft_id,) = drafts_of(r, ALICE)
    assert "text, more" in store.MailboxReader(r, ALICE).raw(draft_id).decode()
    assert r.zcard(keys.folder(ALICE, fields.SENT)) == 0

    # Bad ids and another user's draft: 404, nothing of alice's shown or changed.
    assert alice.get("/compose?draft=nonsense").status_code == 404
    assert alice.get("/compose?draft=").status_code == 404
    before = r.hgetall(keys.message(ALICE, draft_id))
    page = bob.get(f"/compose?draft={draft_id}")
    assert page.status_code == 404 and "sizes" not in page.text
    bob_form = form_of(bob.get("/compose").text)
    got = post(bob, {**bob_form, "saved": draft_id}, url="/compose/draft", subject="hijack")
    assert got.status_code == 404 and got.json["error"] == "There is no such draft."
    # The form keeps what bob typed as his own new draft, never touching alice's.
    got = post(bob, {**bob_form, "saved": draft_id}, action="save", subject="mine")
    assert got.status_code == 200
    assert ("This draft is no longer here (it was sent or deleted): what you typed is kept as a new "
            "draft.") in unescape(got.text)
    assert r.hgetall(keys.message(ALICE, draft_id)) == before
    (bobs,) = drafts_of(r, BOB)
    assert bobs != draft_id and "exact.bin" not in got.text

    # No CSRF token: 400, nothing stored.
    got = post(alice, {**saved, "csrf_token": ""}, url="/compose/draft", subject="forged")
    assert got.status_code == 400 and "This form has expired or did not come from this site" in got.text
    assert "forged" not in store.MailboxReader(r, ALICE).raw(draft_id).decode()
    assert drafts_of(r, ALICE) == [draft_id]


def test_draft_of_a_forward_keeps_the_originals_attachments(client, r) -> None:
    from tests.webutil import put_message

    original = (b"From: ann@remote.test\r\nTo: alice@example.com\r\nSubject: pics\r\n"
                b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
                b"see\r\n--b\r\nContent-Type: image/png\r\n"
                b"Content-Disposition: attachment; filename=p.png\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--b--\r\n")
    msg_id = put_message(r, ALICE, original)
    log_in_as(client, ALICE)
    form = form_of(client.get(f"/compose?forward={msg_id}").text)
    resp = post(client, form, action="save", subject="Fwd: pics", body="look")
    assert [a.split(" (")[0] for a in attached(resp.text)] == ["p.png"]
    again = form_of(resp.text)
    sent = post(client, again, to="bob@example.com", subject="Fwd: pics", body="look")
    assert sent.status_code == 302
    names = [a.get_filename() for a in parsed(store.MailboxReader(r, ALICE).raw(again["draft"]))
             .iter_attachments()]
    assert names == ["p.png"]  # once, not twice


@pytest.mark.dovecot
def test_reconcile_puts_drafts_in_drafts_once(client, r, settings, dovecot, tmp_path: Path,
                                              capsys) -> None:
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    resp = post(client, form, action="save", to="bob@example.com", subject="unsent", body="half done",
                attachments=[(io.BytesIO(b"notes"), "notes.txt", "text/plain")])
    (draft_id,) = drafts_of(r, ALICE)
    raw = store.MailboxReader(r, ALICE).raw(draft_id)
    assert resp.status_code == 200
    s = reconcile_settings(settings, dovecot, tmp_path)
    report_path = tmp_path / "report.json"
    assert main(cli_args(s, "--all", "--report", str(report_path))) == 0
    assert re.search(r"of them drafts \(into \\Drafts\)\s*│\s*1", capsys.readouterr().out)
    report = read_report(report_path)
    assert report["totals"]["drafts"] == 1 and report["totals"]["appended"] == 1
    assert report["mailboxes"][ALICE]["drafts"] == 1
    view = MainStoreView(dovecot, ALICE)
    try:
        [got] = view.messages(dovecot.drafts_name)
    finally:
        view.close()
    assert got["raw"] == raw and fields.DRAFT in got["flags"]
    st = {k.decode(): v.decode() for k, v in r.hgetall(keys.message(ALICE, draft_id)).items()
          if k != b"raw"}
    assert st["rstate"] == "done" and decode_mailbox(st["rbox"]) == dovecot.drafts_name
    again = run_engine(s, [ALICE])
    assert again.ok and again.totals()["appended"] == 0 and again.totals()["drafts"] == 0
    assert ids_on_disk(dovecot, ALICE).count(draft_id) == 1


def test_discard_moves_the_draft_to_trash(client, r) -> None:
    log_in_as(client, ALICE)
    form = form_of(client.get("/compose").text)
    assert "Discard draft" not in client.get("/compose").text  # nothing saved yet: nothing to discard
    saved = form_of(post(client, form, action="save", subject="never mind").text)
    page = client.get(f"/compose?draft={saved['saved']}").text
    assert 'name="action" value="discard">Discard draft</button>' in page
    resp = post(client, form_of(page), action="discard", subject="never mind")
    assert resp.status_code == 302 and resp.headers["Location"] == "/folder/drafts"
    assert drafts_of(r, ALICE) == []
    assert r.zrange(keys.folder(ALICE, fields.TRASH), 0, -1) == [saved["saved"].encode()]
    assert r.zcard(keys.folder(ALICE, fields.SENT)) == 0
