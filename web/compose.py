"""The compose form: new message, reply, reply-all and forward.

The form carries a message id made when it was shown, signed with the secret
key so that nobody can choose the id another mailbox's message has; sending
the same form twice sends once.  `From` is always the logged-in address.  A
form error re-shows everything typed (attachments excepted: browsers cannot
refill a file field) and sends nothing.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Blueprint, g, redirect, render_template, request, url_for

from fallback.errors import InputError
from fallback.ids import is_id, new_id
from fallback.intake.submission import Draft, send
from fallback.mailbox import fields, store
from web import render
from web.auth import login_required
from web.context import state
from web.mailbox import raw_or_404
from web.outgoing import MAX_SUBJECT, check_header_text, parse_addresses
from web.sessions import sign

bp = Blueprint("compose", __name__)

FIELDS = ("to", "cc", "bcc", "subject", "body")


def _original(msg_id: str) -> bytes | None:
    """The message replied to or forwarded, if any (owned by the user, else 404)."""
    return raw_or_404(msg_id) if msg_id else None


def _quote(raw: bytes) -> str:
    who = render.find_header(raw, "From") or "someone"
    when = render.find_header(raw, "Date")
    text = render.body_text(raw)
    quoted = "\n".join("> " + line if line else ">" for line in text.rstrip("\n").split("\n"))
    return f"\n\nOn {when}, {who} wrote:\n{quoted}\n" if when else f"\n\n{who} wrote:\n{quoted}\n"


def _prefixed(prefix: str, subject: str) -> str:
    return subject if subject.lower().startswith(prefix.lower()) else f"{prefix} {subject}"


def _addresses(raw: bytes, name: str) -> list[str]:
    try:
        return [a for _, a in parse_addresses(name, render.find_header(raw, name))]
    except InputError:
        return []


def _reply_values(raw: bytes, reply_all: bool) -> dict[str, str]:
    me = g.user
    reply_to = _addresses(raw, "Reply-To") or _addresses(raw, "From")
    if reply_to == [me]:  # replying to one's own sent message: write to its recipients again
        reply_to = _addresses(raw, "To") or reply_to
    to = [a for a in reply_to if a != me] or reply_to
    cc: list[str] = []
    if reply_all:
        for a in _addresses(raw, "To") + _addresses(raw, "Cc"):
            if a != me and a not in to and a not in cc:
                cc.append(a)
    return {"to": ", ".join(to), "cc": ", ".join(cc),
            "subject": _prefixed("Re:", render.find_header(raw, "Subject")), "body": _quote(raw)}


def _forward_values(raw: bytes) -> dict[str, str]:
    head = "\n".join(f"{n}: {render.find_header(raw, n)}" for n in ("From", "Date", "Subject", "To")
                     if render.find_header(raw, n))
    text = render.body_text(raw)
    return {"subject": _prefixed("Fwd:", render.find_header(raw, "Subject")),
            "body": f"\n\n---------- Forwarded message ----------\n{head}\n\n{text}"}


def _form(values: dict[str, str], error: str | None = None, status: int = 200) -> Any:
    st = state()
    draft = values.get("draft") or new_id()
    carried = []
    if values.get("forward_of"):
        raw = _original(values["forward_of"])
        carried = [(n, len(d)) for n, _, d in render.original_parts(raw or b"")]
    html = render_template(
        "compose.html", v=values, error=error, draft=draft, carried=carried,
        draft_sig=sign(st.secret, g.user, draft), limit=st.settings.max_upload_size,
    )
    return html, status


@bp.get("/compose")
@login_required
def compose_form() -> Any:
    values = dict.fromkeys(FIELDS, "")
    reply, forward = request.args.get("reply", ""), request.args.get("forward", "")
    if reply:
        raw = _original(reply)
        assert raw is not None
        values.update(_reply_values(raw, request.args.get("all") == "1"))
        values["reply_to"] = reply
    elif forward:
        raw = _original(forward)
        assert raw is not None
        values.update(_forward_values(raw))
        values["forward_of"] = forward
    else:
        values["to"] = request.args.get("to", "")[:1000].replace("\r", "").replace("\n", "")
    return _form(values)


@bp.post("/compose")
@login_required
def send_message() -> Any:
    st = state()
    form = request.form  # POST parameters come from the body only
    values = {k: form.get(k, "") for k in (*FIELDS, "reply_to", "forward_of", "draft")}
    draft_id = values["draft"]
    if not is_id(draft_id) or not hmac.compare_digest(
            sign(st.secret, g.user, draft_id), form.get("draft_sig", "")):
        values["draft"] = ""
        return _form(values, "This form is out of date; check your message and send it again.", 400)
    try:
        to = parse_addresses("To", values["to"])
        cc = parse_addresses("Cc", values["cc"])
        bcc = parse_addresses("Bcc", values["bcc"])
        check_header_text("Subject", values["subject"])
        if len(values["subject"]) > MAX_SUBJECT:
            raise InputError("subject too long", public="The subject is too long.")
        if not (to or cc or bcc):
            raise InputError("no recipients", public="Add at least one recipient in To, Cc or Bcc.")
        draft = Draft(g.user, to, cc, bcc, values["subject"], values["body"])
        if len(draft.recipients()) > st.settings.max_recipients:
            raise InputError("too many recipients", public=f"Too many recipients: at most "
                             f"{st.settings.max_recipients} in one message.")
        _attach_uploads(draft)
        _apply_reply_or_forward(draft, values)
    except InputError as exc:
        return _form(values, exc.public + " Nothing was sent.", 400)

    out = send(st.r, st.directory(), st.scope, draft, draft_id, st.settings.hostname or "localhost",
               request.remote_addr or "unknown")
    if not out.already_sent:
        if values["reply_to"]:
            store.set_flags(st.r, g.user, values["reply_to"], add=(fields.ANSWERED,))
        if values["forward_of"]:
            store.set_flags(st.r, g.user, values["forward_of"], add=(fields.FORWARDED,))
    status = "again" if out.already_sent else ("partial" if out.failed_local else "1")
    return redirect(url_for("mailbox.message", msg_id=draft_id, sent=status))


def _attach_uploads(draft: Draft) -> None:
    limit = state().settings.max_upload_size
    total = 0
    for upload in request.files.getlist("attachments"):
        if not upload or not upload.filename:
            continue
        data = upload.read(limit + 1 - total)
        total += len(data)
        if total > limit:
            raise InputError("attachments too big", public=(
                f"The attachments are too big: at most {limit // (1024 * 1024)} MiB in total. "
                "Attach smaller files."))
        check_header_text("The attachment's name", upload.filename)
        draft.attachments.append((upload.filename, upload.mimetype or "", data))


def _apply_reply_or_forward(draft: Draft, values: dict[str, str]) -> None:
    if values["reply_to"]:
        raw = _original(values["reply_to"])
        assert raw is not None
        draft.in_reply_to = render.find_header(raw, "Message-ID")
        draft.references = render.find_header(raw, "References")
        check_header_text("References", draft.in_reply_to + draft.references)
    if values["forward_of"]:
        raw = _original(values["forward_of"])
        assert raw is not None
        draft.attachments.extend(render.original_parts(raw))
