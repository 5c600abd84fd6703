"""The console's audit log (paged, newest first), the live incident text (set, clear) and the
message trace (one message's timeline, or the recent messages of an address).

The audit log is read a page at a time from its Redis stream
(fallback.ops.audit.page: the link to the next page names the stream id to
go on from).  The incident text is the one `fallback incident` sets
(fallback.ops.incident): checked before anything is written, and each
change audited as "incident set" / "incident clear".
"""

from __future__ import annotations

import re
from typing import Any

from flask import Response, redirect, render_template, request, url_for

from fallback import ids
from fallback.addresses import normalize_address
from fallback.errors import InputError
from fallback.ops import audit, incident, trace
from web.console import actor, bp, record
from web.console.format import when
from web.context import state

PAGE = 50
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
MESSAGES = {
    "bad_id": "That is not a message id (26 characters, as the mail log and the queues show).",
    "bad_address": "That is not an email address.",
    "no_trace": "There is no trace of that message (never seen here, or older than the trace retention).",
    "bad_page": "That page of the audit log does not exist (use the links on the page).",
    "empty": "The incident text is empty: type the text, or use \"Clear it\" to remove the live text.",
    "set": "The incident text is set; users see it within a few seconds.",
    "cleared": "The incident text is cleared; users see the configured incident_message again.",
    "none": "No live incident text was set; nothing changed.",
}


@bp.get("/audit")
def audit_log() -> Any:
    before = request.args.get("before") or None
    if before is not None and not _STREAM_ID.fullmatch(before):
        return Response(render_template("admin/audit.html", entries=[], next_before=None,
                                        error=MESSAGES["bad_page"], when=when), 400)
    entries, next_before = audit.page(state().r, before, PAGE)
    return render_template("admin/audit.html", entries=entries, next_before=next_before, error=None,
                           when=when, first=before is None)


def _incident_page(error: str | None = None, typed: str | None = None, status: int = 200,
                   notice: str | None = None) -> Response:
    live = incident.read(state().r)
    html = render_template("admin/incident.html", live=live, error=error, notice=notice,
                           typed=typed if typed is not None else (live.text if live else ""),
                           configured=state().settings.incident_message, when=when,
                           max_length=incident.MAX_LENGTH)
    return Response(html, status)


@bp.get("/incident")
def incident_form() -> Any:
    notice = MESSAGES.get(request.args.get("done", ""))
    return _incident_page(notice=notice)


@bp.post("/incident")
def incident_set() -> Any:
    typed = request.form.get("text", "")
    if not typed.strip():
        return _incident_page(MESSAGES["empty"], typed[:2 * incident.MAX_LENGTH], 400)
    try:
        text = incident.check_text(typed)   # refused before anything is written or audited
    except InputError as exc:
        return _incident_page(exc.reason, typed[:2 * incident.MAX_LENGTH], 400)
    incident.set_text(state().r, text, actor())
    record("incident set", {"text": text})
    return redirect(url_for("console.incident_form", done="set"))


@bp.post("/incident/clear")
def incident_clear() -> Any:
    before = incident.clear(state().r)
    record("incident clear", {"text": before.text if before else None},
           "ok" if before else "ok: no live text was set")
    return redirect(url_for("console.incident_form", done="cleared" if before else "none"))


@bp.get("/trace")
def trace_page() -> Any:
    """?id=ID: the message's events, oldest first; ?address=A: its recent messages."""
    r = state().r
    msg_id, address = request.args.get("id", "").strip(), request.args.get("address", "").strip()
    args: dict[str, Any] = {"msg_id": msg_id, "address": address, "events": None, "messages": None,
                            "error": None, "when": when}
    if msg_id:
        if not ids.is_id(msg_id):
            args["error"] = MESSAGES["bad_id"]
        else:
            args["events"] = trace.message(r, msg_id)
            if args["events"] is None:
                args["error"] = MESSAGES["no_trace"]
                return Response(render_template("admin/trace.html", **args), 404)
    elif address:
        try:
            args["messages"] = trace.recent(r, normalize_address(address), limit=PAGE)
        except InputError:
            args["error"] = MESSAGES["bad_address"]
    status = 400 if args["error"] else 200
    return Response(render_template("admin/trace.html", **args), status)
