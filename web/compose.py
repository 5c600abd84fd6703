"""The compose form: new message, reply, reply-all and forward.

The form carries a message id made when it was shown, signed with the secret
key so that nobody can choose the id another mailbox's message has; sending
the same form twice sends once.  `From` is always the logged-in address.  Every
POST stores the form as a draft first (web/drafts.py), attachments included,
so a form error re-shows everything typed and uploaded and sends nothing
(a refused upload is the one thing to choose again): 400 for what
the user must change (a header character mail cannot carry names the field
and the character), 429 over the per-user send limits (with when sending
works again; the operator is alerted once per user and window), 409 while
the same form is still being sent.  "Save draft" (action=save) only stores.
A message filed for sending leaves Drafts.
"""

from __future__ import annotations

import hmac
import math
import time
from typing import Any

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from flask_babel import gettext, lazy_gettext, ngettext

from fallback.errors import InputError
from fallback.ids import is_id, new_id
from fallback.intake import sendlimits
from fallback.intake.addressing import Policy
from fallback.intake.submission import Draft, send
from fallback.mailbox import contacts, fields, store, threads
from fallback.maillog import MailLog
from fallback.ops.metrics import MailCounters
from web import drafts, i18n, render
from web.auth import login_required
from web.context import state
from web.mailbox import raw_or_404
from web.outgoing import (
    MAX_SUBJECT,
    check_header_text,
    parse_addresses,
    thread_ids,
)
from web.sessions import sign

bp = Blueprint("compose", __name__)

FIELDS = ("to", "cc", "bcc", "subject", "body")
UNDONE = lazy_gettext("Sending undone: the message is back in Drafts. Nothing was sent.")
SAVED = lazy_gettext("Draft saved.")
NOTHING_SENT = lazy_gettext("Nothing was sent.")


def _original(msg_id: str) -> bytes | None:
    """The message replied to or forwarded, if any (owned by the user, else 404)."""
    return raw_or_404(msg_id) if msg_id else None


def _quote(raw: bytes) -> str:
    who = render.find_header(raw, "From") or gettext("someone")
    when = render.find_header(raw, "Date")
    text = render.body_text(raw)
    quoted = "\n".join("> " + line if line else ">" for line in text.rstrip("\n").split("\n"))
    said = (gettext("On %(when)s, %(who)s wrote:", when=when, who=who) if when
            else gettext("%(who)s wrote:", who=who))
    return f"\n\n{said}\n{quoted}\n"


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
            "body": f"\n\n---------- {gettext('Forwarded message')} ----------\n{head}\n\n{text}"}


def _form(values: dict[str, str], error: str | None = None, status: int = 200,
          kept: drafts.Kept | None = None, attached: list[dict[str, Any]] | None = None,
          note: str | None = None) -> Any:
    st = state()
    draft = values.get("draft") or new_id()
    carried = []
    if kept is not None:
        values["saved"] = kept.draft_id
        attached = kept.listed()
        note = " ".join(t for t in (kept.notice, note) if t) or None
    elif values.get("forward_of") and not values.get("saved"):
        raw = _original(values["forward_of"])
        carried = [(n, len(d)) for n, _, d in render.original_parts(raw or b"")]
    html = render_template(
        "compose.html", v=values, error=error, draft=draft, carried=carried, attached=attached or [],
        note=note, draft_sig=sign(st.secret, g.user, draft), limit=st.settings.max_upload_size,
    )
    return html, status


@bp.get("/compose")
@login_required
def compose_form() -> Any:
    values = dict.fromkeys(FIELDS, "")
    reply, forward = request.args.get("reply", ""), request.args.get("forward", "")
    if "draft" in request.args:
        found = drafts.open_draft(request.args["draft"])
        if found is None:
            abort(404)
        values.update(found[0])
        values["saved"] = request.args["draft"]
        note = str(UNDONE) if request.args.get("undone") == "1" else None
        return _form(values, attached=drafts.listed(found[1]), note=note)
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
    values = {k: form.get(k, "") for k in (*FIELDS, "reply_to", "forward_of", "draft", "saved")}
    draft_id = values["draft"]
    kept = drafts.keep(form, values, draft_id)
    if not kept.stored:  # this form was sent already (a second click, a reload)
        return redirect(url_for("mailbox.message", msg_id=draft_id, sent="again"))
    if not is_id(draft_id) or not hmac.compare_digest(
            sign(st.secret, g.user, draft_id), form.get("draft_sig", "")):
        values["draft"] = ""
        return _form(values, gettext("This form is out of date; check your message and send it again."),
                     400, kept)
    if form.get("action") == "save":
        return _form(values, kept=kept, note=str(SAVED))
    if form.get("action") == "discard":  # to Trash, where it can be restored or deleted for good
        store.move(st.r, g.user, kept.draft_id, fields.TRASH)
        return redirect(url_for("mailbox.folder", name="drafts"))
    try:
        if kept.error:
            raise InputError("upload refused", public=kept.error)
        to = parse_addresses("To", values["to"])
        cc = parse_addresses("Cc", values["cc"])
        bcc = parse_addresses("Bcc", values["bcc"])
        check_header_text("Subject", values["subject"])
        if len(values["subject"]) > MAX_SUBJECT:
            raise InputError("subject too long", public=gettext("The subject is too long."))
        if not (to or cc or bcc):
            raise InputError("no recipients", public=gettext("Add at least one recipient in To, Cc or Bcc."))
        draft = Draft(g.user, to, cc, bcc, values["subject"], values["body"], list(kept.attachments))
        if len(draft.recipients()) > st.settings.max_recipients:
            raise InputError("too many recipients", public=gettext(
                "Too many recipients: at most %(n)s in one message.", n=st.settings.max_recipients))
        _apply_reply(draft, values)
        limits = sendlimits.Limits(st.settings.send_limit_per_hour, st.settings.send_limit_per_day)
        out = send(st.r, st.directory(), st.scope, draft, draft_id, st.settings.hostname or "localhost",
                   request.remote_addr or "unknown", limits, Policy.of(st.settings),
                   undo_seconds=st.settings.undo_send_seconds, saved=kept.draft_id,
                   form={k: values[k] for k in drafts.FORM_FIELDS},
                   log=MailLog(counters=MailCounters(st.counters)))  # counted and traced
    except InputError as exc:
        return _form(values, f"{i18n.public_text(exc)} {NOTHING_SENT}{_again(kept)}", 400, kept)
    if out.limited is not None:
        _log_limited(out.limited, draft, draft_id)
        return _form(values, f"{limit_text(out.limited, time.time())} {NOTHING_SENT}", 429, kept)
    if out.in_progress:
        return _form(values, gettext("This message is being sent right now, or its last attempt was cut "
                                     "short. Look in Sent in a minute; if it is not there, send it "
                                     "again."), 409, kept)
    drafts.delete_sent(kept.draft_id)
    if not out.already_sent:
        # Issue 15: Bcc is in no stored copy, so it is remembered here; the Sent copy's To and
        # Cc and its place in its conversation come from the index's pass over it.
        contacts.record_sent(st.r, g.user, bcc, int(time.time() * 1000))
        threads.catch_up(st.r, g.user)
        if values["reply_to"]:
            store.set_flags(st.r, g.user, values["reply_to"], add=(fields.ANSWERED,))
        if values["forward_of"]:
            store.set_flags(st.r, g.user, values["forward_of"], add=(fields.FORWARDED,))
    if out.undo_until:
        return redirect(url_for("undo.sending", msg_id=draft_id))
    status = ("again" if out.already_sent else "partial" if out.failed_local
              else "held" if out.held else "1")
    return redirect(url_for("mailbox.message", msg_id=draft_id, sent=status))


def _again(kept: drafts.Kept) -> str:
    """Only a refused upload must be chosen again: the others are kept with the draft."""
    return " " + gettext("Attach your files again: a browser cannot keep them.") if kept.error else ""


def _log_limited(refusal: sendlimits.Refusal, draft: Draft, msg_id: str) -> None:
    """Each refused recipient in the mail log (counted in /metrics as rejected, 429); the
    operator's alert once per user and window, not once per attempt."""
    log = MailLog(counters=MailCounters(state().counters))
    reason = (f"send limit: {refusal.used} of {refusal.limit} recipients per {refusal.window} "
              f"used, {refusal.wanted} more refused")
    for addr in draft.recipients():
        log.rejected(msg_id, draft.sender, addr, outcome="429", reason=reason)
    if refusal.first:
        until = (f"; sending works again at {_clock(refusal.retry_at)}"
                 if refusal.retry_at is not None else "")
        log.alert(None, draft.sender, route="outbound", reason=(
            f"webmail user reached the send limit of {refusal.limit} recipients per "
            f"{refusal.window}{until}; if the account is stolen: fallback queue hold --user "
            f"{draft.sender}"))


def _clock(ts: float) -> str:
    return time.strftime("%H:%M UTC", time.gmtime(ts))


def _wait(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    if minutes < 120:
        return ngettext("in %(num)s minute", "in %(num)s minutes", minutes)
    return gettext("in about %(n)s hours", n=round(minutes / 60))


def _per(window: str) -> str:
    return gettext("per hour") if window == "hour" else gettext("per day")


def _last(window: str) -> str:
    return gettext("in the last hour") if window == "hour" else gettext("in the last day")


def limit_text(refusal: sendlimits.Refusal, now: float) -> str:
    """What the user reads on the 429 page: which limit, and when sending works again."""
    per, last = _per(refusal.window), _last(refusal.window)
    if refusal.retry_at is None:
        return gettext("This message has %(wanted)s recipients, more than the %(limit)s %(per)s "
                       "this service allows during the outage. Send it to fewer recipients.",
                       wanted=refusal.wanted, limit=refusal.limit, per=per)
    when = f"{_clock(refusal.retry_at)} ({_wait(refusal.retry_at - now)})"
    if refusal.used >= refusal.limit:
        return gettext("You have sent to %(used)s recipients %(last)s, the limit for this service "
                       "during the outage. You can send again at %(when)s.",
                       used=refusal.used, last=last, when=when)
    room = refusal.limit - refusal.used
    return ngettext("This message has %(wanted)s recipients, but you have sent to %(used)s %(last)s "
                    "and the limit for this service during the outage is %(limit)s %(per)s. You can "
                    "send it at %(when)s, or send it now to at most %(num)s recipient.",
                    "This message has %(wanted)s recipients, but you have sent to %(used)s %(last)s "
                    "and the limit for this service during the outage is %(limit)s %(per)s. You can "
                    "send it at %(when)s, or send it now to at most %(num)s recipients.",
                    room, wanted=refusal.wanted, used=refusal.used, last=last, limit=refusal.limit,
                    per=per, when=when)


def _apply_reply(draft: Draft, values: dict[str, str]) -> None:
    """Threading headers of a reply (a forward's attachments came with the draft, drafts.keep)."""
    if values["reply_to"]:
        raw = _original(values["reply_to"])
        assert raw is not None
        # From mail anyone can send: only well-formed ids are carried, never refused.
        draft.in_reply_to = thread_ids(render.find_header(raw, "Message-ID"), keep=1)
        draft.references = thread_ids(render.find_header(raw, "References"))
    if values["forward_of"]:
        _original(values["forward_of"])  # another user's message: 404, as before
