"""Undo send: the page after Send while the message waits, and its Undo button.

The wait itself is fallback/queues/delayed.py's.  The page (`/sent/<id>`) shows
how long is left and a POST form (CSRF) that puts the message back into Drafts
with its attachments; once the time is up, or a worker took the message, the
page and the button say plainly that it was sent.  An undone message gives its
recipients back to the send limits (sendlimits.refund): it never left.
"""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from flask_babel import lazy_gettext

from fallback.ids import is_id, new_id
from fallback.intake import sendlimits, submission
from fallback.mailbox import directory, drafts
from fallback.queues import delayed
from web.auth import login_required
from web.context import state

bp = Blueprint("undo", __name__)

MESSAGES = {
    "too_late": lazy_gettext("Too late to undo: this message was already sent."),
}  # and compose.UNDONE on the draft it puts back


def _id_or_404(msg_id: str) -> str:
    if not is_id(msg_id):
        abort(404)
    return msg_id


@bp.get("/sent/<msg_id>")
@login_required
def sending(msg_id: str) -> Any:
    left = delayed.remaining(state().r, g.user, _id_or_404(msg_id))
    if left <= 0:
        return redirect(url_for("mailbox.message", msg_id=msg_id, sent="1"))
    return render_template("undo.html", msg_id=msg_id, left=math.ceil(left), error=None)


@bp.post("/sent/<msg_id>/undo")
@login_required
def undo(msg_id: str) -> Any:
    st = state()
    got = delayed.undo(st.r, g.user, _id_or_404(msg_id))
    if got is None:
        return render_template("undo.html", msg_id=msg_id, left=0, error=str(MESSAGES["too_late"])), 409
    sendlimits.refund(st.r, g.user, msg_id, got.counted)
    draft_id = got.saved if is_id(got.saved) else new_id()
    raw = submission.received_line(draft_id, st.settings.hostname or "localhost",
                                   request.remote_addr or "unknown") + got.body
    mailbox = st.directory().get(g.user)
    mailstore = mailbox.mailstore if mailbox else directory.DEFAULT_MAILSTORE
    try:
        drafts.save(st.r, g.user, mailstore, draft_id, raw, got.form)
    except drafts.NotADraft:
        draft_id = new_id()
        drafts.save(st.r, g.user, mailstore, draft_id, raw, got.form)
    return redirect(url_for("compose.compose_form", draft=draft_id, undone=1))
