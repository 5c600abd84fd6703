"""The compose form's draft: what of the form is kept on the server, and the autosave endpoint.

Every POST of the compose form (Send, Save draft, and compose.js's autosave)
stores the form as a draft first (fallback/mailbox/drafts.py), so nothing
typed or uploaded is lost to a form error, a logout or an expired session:
the attachments then live in the draft's bytes and the re-shown form lists
them as "attached" with a remove box each, named by a digest of their bytes so
that the boxes stay right however the list changed meanwhile.  The draft's
own id (hidden field `saved`) is a second id beside the form's send id: the
Sent copy takes the send id, and the draft is deleted once the send is filed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, g, jsonify, request
from flask_babel import lazy_gettext
from werkzeug.datastructures import MultiDict

from fallback import keys
from fallback.errors import InputError
from fallback.ids import is_id, new_id
from fallback.intake import submission
from fallback.mailbox import directory, drafts, store
from web import filters, render
from web.auth import login_required
from web.context import state
from web.outgoing import MAX_SUBJECT, check_header_text, clean_header_text, parse_addresses, thread_ids

bp = Blueprint("drafts", __name__)

# What the draft keeps of the form as typed (the bytes hold the rest).
FORM_FIELDS = ("to", "cc", "bcc", "subject", "body", "reply_to", "forward_of")
MESSAGES = {
    "too_big": lazy_gettext("The attachments are too big: at most %(size)s in total. Attach smaller files."),
    "gone": lazy_gettext("This draft is no longer here (it was sent or deleted): what you typed is kept "
                         "as a new draft."),
    "sent": lazy_gettext("This message was sent; it is no longer a draft."),
    "not_found": lazy_gettext("There is no such draft."),
}

Attachment = tuple[str, str, bytes]  # (file name, content type, bytes)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Kept:
    """A compose POST's draft after it was stored: its id, attachments and any upload refused."""

    draft_id: str
    attachments: list[Attachment] = field(default_factory=list)
    error: str | None = None  # an upload refused (too big, a name mail cannot carry)
    notice: str | None = None  # the draft named was gone: a new one was started
    stored: bool = False

    def listed(self) -> list[dict[str, Any]]:
        return [{"name": n, "size": len(d), "digest": digest(d)} for n, _, d in self.attachments]


def listed(raw: bytes) -> list[dict[str, Any]]:
    return Kept("", render.original_parts(raw)).listed()


def _load(draft_id: str) -> tuple[dict[str, str], bytes] | None:
    if not is_id(draft_id):
        return None
    try:
        return drafts.load(state().r, g.user, draft_id)
    except drafts.NotADraft:
        return None


def open_draft(draft_id: str) -> tuple[dict[str, str], bytes] | None:
    """The user's draft (form values, raw) for /compose?draft=ID; None: not theirs, or gone."""
    return _load(draft_id)


def _uploads(limit: int, already: int) -> tuple[list[Attachment], str | None]:
    """The files of this POST; on any refusal none of them is kept (the page says so)."""
    out: list[Attachment] = []
    total = already
    for upload in request.files.getlist("attachments"):
        if not upload or not upload.filename:
            continue
        data = upload.read(limit + 1 - total)
        total += len(data)
        try:
            if total > limit:
                mib = 1024 * 1024
                size = f"{limit // mib} MiB" if limit % mib == 0 else filters.human_size(limit)
                raise InputError("attachments too big", public=str(MESSAGES["too_big"]) % {"size": size})
            check_header_text("Attachment", upload.filename)
        except InputError as exc:
            return [], exc.public
        out.append((upload.filename, upload.mimetype or "", data))
    return out, None


def keep(form: MultiDict[str, str], values: dict[str, str], send_id: str, uploads: bool = True) -> Kept:
    """Store the form as the user's draft (created or updated in place) and say what it holds."""
    st = state()
    r = st.r
    if is_id(send_id) and r.get(keys.compose_once(g.user, send_id)) == submission.SENT:
        return Kept(values.get("saved", ""), error=str(MESSAGES["sent"]))  # a late autosave of a sent form
    saved = values.get("saved", "")
    found = _load(saved) if saved else None
    kept = Kept(saved if found is not None else new_id())
    if saved and found is None:
        kept.notice = str(MESSAGES["gone"])
    if found is not None:
        gone = set(form.getlist("remove"))
        kept.attachments = [a for a in render.original_parts(found[1]) if digest(a[2]) not in gone]
    elif values.get("forward_of"):
        original = _original(values["forward_of"]) or b""
        kept.attachments = [(clean_header_text(n), c, d) for n, c, d in render.original_parts(original)]
    if uploads:
        limit = st.settings.max_upload_size
        new, kept.error = _uploads(limit, sum(len(d) for _, _, d in kept.attachments))
        kept.attachments += new
    raw = draft_bytes(values, kept.attachments, kept.draft_id)
    mailbox = st.directory().get(g.user)
    mailstore = mailbox.mailstore if mailbox else directory.DEFAULT_MAILSTORE
    try:
        drafts.save(r, g.user, mailstore, kept.draft_id, raw, {k: values.get(k, "") for k in FORM_FIELDS})
    except drafts.NotADraft:  # the id of some other message of theirs: never overwritten
        kept.draft_id, kept.notice = new_id(), str(MESSAGES["gone"])
        drafts.save(r, g.user, mailstore, kept.draft_id, raw, {k: values.get(k, "") for k in FORM_FIELDS})
    kept.stored = True
    return kept


def _original(msg_id: str) -> bytes | None:
    return store.MailboxReader(state().r, g.user).raw(msg_id) if is_id(msg_id) else None


def _lenient(name: str, value: str) -> list[tuple[str, str]]:
    try:
        return parse_addresses(name, value)
    except InputError:
        return []  # kept as typed in the draft's form; the send names what is wrong


def draft_bytes(values: dict[str, str], attachments: list[Attachment], draft_id: str) -> bytes:
    """The MIME a send of this form would produce (submission.build), with a Received: line of
    the draft's id first, as every message of ours has; what mail cannot carry is left out."""
    st = state()
    d = submission.Draft(g.user, _lenient("To", values.get("to", "")), _lenient("Cc", values.get("cc", "")),
                         [], clean_header_text(values.get("subject", ""))[:MAX_SUBJECT],
                         values.get("body", ""), [(clean_header_text(n), c, b) for n, c, b in attachments])
    original = _original(values.get("reply_to", ""))
    if original is not None:
        d.in_reply_to = thread_ids(render.find_header(original, "Message-ID"), keep=1)
        d.references = thread_ids(render.find_header(original, "References"))
    domain = g.user.rpartition("@")[2]
    try:
        body = submission.build(d, draft_id, domain)
    except ValueError:  # an odd address the builder refuses: the form keeps it as typed
        d.to, d.cc = [], []
        body = submission.build(d, draft_id, domain)
    return submission.received_line(draft_id, st.settings.hostname or "localhost",
                                    request.remote_addr or "unknown") + body


def delete_sent(draft_id: str) -> None:
    """The draft's message was sent: it leaves Drafts."""
    if is_id(draft_id):
        drafts.delete(state().r, g.user, draft_id)


@bp.post("/compose/draft")
@login_required
def autosave() -> Any:
    """compose.js's save (every few seconds of typing, and on leaving the page): JSON
    {id, saved_at}.  Files are not sent this way; the attachments already stored are kept."""
    form = request.form
    values = {k: form.get(k, "") for k in (*FORM_FIELDS, "saved")}
    for name in ("to", "cc", "bcc", "subject"):
        values[name] = values[name][:MAX_SUBJECT * 4]
    if values["saved"] and _load(values["saved"]) is None:
        return jsonify(error=str(MESSAGES["not_found"])), 404
    kept = keep(form, values, form.get("draft", ""), uploads=False)
    if not kept.stored:
        return jsonify(error=kept.error), 409
    return jsonify(id=kept.draft_id, saved_at=time.strftime("%H:%M:%S UTC", time.gmtime()))
