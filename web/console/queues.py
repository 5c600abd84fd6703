"""The console's outbound and forward queues: list (paged), show, retry, hold, delete.

The same operations as `fallback queue ... [--forward]` (fallback.queues.
outbound, hold, forward_ops), audited under the same action names with the
console as `via`.  Holding an outbound message holds its sender (all of
their outbound mail, as `fallback queue hold --user` does); holding a
forward message holds that message.  Deleting asks first: a GET shows what
will happen, only the POST of that page deletes.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from flask import Response, redirect, render_template, request, url_for
from werkzeug.exceptions import NotFound as HttpNotFound

from fallback.errors import FallbackError, NotFound
from fallback.queues import forward_ops, hold, outbound
from web.console import actor, bp, record, render_error
from web.console.format import ago, size, when
from web.context import state

PAGE = 50
KINDS = ("outbound", "forward")
TEXTS = {
    "outbound": "Mail sent from the webmail, waiting for the smarthost",
    "forward": "Mail for healthy mailstores, waiting for the main system (one row per recipient)",
}


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise HttpNotFound()
    return kind


def _start() -> int:
    text = request.args.get("start", "0")
    return int(text) if text.isdigit() and len(text) < 10 else 0


def _failed(exc: FallbackError) -> Response:
    busy = isinstance(exc, (outbound.Busy, forward_ops.Busy))
    code = 404 if isinstance(exc, NotFound) else 409 if busy else 400
    return render_error(code, exc.reason)


@bp.get("/queues/<kind>")
def queue_list(kind: str) -> Any:
    kind, r, now = _kind(kind), state().r, time.time()
    start = _start()
    items: list[Any] = outbound.scan(r) if kind == "outbound" else forward_ops.scan(r)
    held = hold.held_senders(r) if kind == "outbound" else []
    return render_template("admin/queue.html", kind=kind, text=TEXTS[kind], total=len(items),
                           items=items[start:start + PAGE], start=start, page=PAGE, held=held, now=now,
                           ago=ago, when=when, size=size)


def _outbound_view(msg_id: str) -> Any:
    r = state().r
    item = outbound.find(r, msg_id)
    return render_template("admin/show_outbound.html", item=item, held=hold.get(r, item.sender),
                           now=time.time(), ago=ago, when=when, final=outbound.FINAL)


@bp.get("/queues/<kind>/<msg_id>")
def queue_show(kind: str, msg_id: str) -> Any:
    try:
        if _kind(kind) == "outbound":
            return _outbound_view(msg_id)
        items = forward_ops.find(state().r, msg_id)
    except FallbackError as exc:
        return _failed(exc)
    return render_template("admin/show_forward.html", items=items, first=items[0], now=time.time(),
                           ago=ago, when=when, size=size)


def _done(kind: str, msg_id: str, notice: str) -> Any:
    return redirect(url_for("console.queue_show", kind=kind, msg_id=msg_id, done=notice))


@bp.post("/queues/<kind>/<msg_id>/retry")
def queue_retry(kind: str, msg_id: str) -> Any:
    r = state().r
    try:
        if _kind(kind) == "outbound":
            item = outbound.retry_now(r, msg_id)
            record("queue retry", {"id": item.msg_id, "sender": item.sender}, "ok: queued for delivery now")
            return _done(kind, msg_id, "retry")
        items = forward_ops.find(r, msg_id)
        done = [i for i in items if forward_ops.retry(r, i, time.time())]
    except FallbackError as exc:
        return _failed(exc)
    record("queue forward-retry", {"id": msg_id, "sender": items[0].sender,
                                   "recipients": [i.recipient for i in items]},
           f"ok: {len(done)} of {len(items)} recipient(s) due now")
    return _done(kind, msg_id, "retry")


@bp.post("/queues/<kind>/<msg_id>/hold")
def queue_hold(kind: str, msg_id: str) -> Any:
    r, reason = state().r, request.form.get("reason", "").strip()[:200]
    try:
        if _kind(kind) == "outbound":
            item = outbound.find(r, msg_id)
            held = hold.hold(r, item.sender, record_actor(), reason)
            if held.new:
                record("queue hold", {"user": item.sender, "reason": reason},
                       f"ok: {held.queued} message(s) held")
            return _done(kind, msg_id, "hold")
        items = forward_ops.find(r, msg_id)
        settings = state().settings
        done = [i for i in items if i.where != "held"
                and forward_ops.hold(r, i, record_actor(), time.time(), settings.claim_timeout)]
    except FallbackError as exc:
        return _failed(exc)
    record("queue forward-hold", {"id": msg_id, "sender": items[0].sender,
                                  "recipients": [i.recipient for i in items]},
           f"ok: {len(done)} recipient(s) held")
    return _done(kind, msg_id, "hold")


@bp.post("/queues/outbound/<msg_id>/release")
def queue_release(msg_id: str) -> Any:
    r = state().r
    try:
        item = outbound.find(r, msg_id)
        released = hold.release(r, item.sender)
    except FallbackError as exc:
        return _failed(exc)
    record("queue release", {"user": item.sender}, f"ok: {released.queued} message(s) released")
    return _done("outbound", msg_id, "release")


def record_actor() -> str:
    """Who a hold names (the listing shows it)."""
    return f"{actor()} (console)"


@bp.get("/queues/<kind>/<msg_id>/delete")
def queue_delete_form(kind: str, msg_id: str) -> Any:
    r = state().r
    try:
        if _kind(kind) == "outbound":
            item = outbound.find(r, msg_id)
            pending = len(item.record.pending()) if item.record else 0
            return render_template("admin/confirm_delete.html", kind=kind, msg_id=item.msg_id,
                                   sender=item.sender, recipients=[], pending=pending)
        items = forward_ops.find(r, msg_id)
    except FallbackError as exc:
        return _failed(exc)
    return render_template("admin/confirm_delete.html", kind=kind, msg_id=msg_id, sender=items[0].sender,
                           recipients=[i.recipient for i in items], pending=len(items))


@bp.post("/queues/<kind>/<msg_id>/delete")
def queue_delete(kind: str, msg_id: str) -> Any:
    r, settings = state().r, state().settings
    try:
        if _kind(kind) == "outbound":
            item = outbound.find(r, msg_id)
            pending = len(item.record.pending()) if item.record else 0
            outbound.delete(r, item.msg_id, settings.hostname or socket.gethostname(), settings.claim_timeout)
            record("queue delete", {"id": item.msg_id, "sender": item.sender},
                   f"ok: {pending} recipient(s) marked failed")
            return redirect(url_for("console.queue_list", kind=kind, deleted=item.msg_id))
        items = forward_ops.find(r, msg_id)
        done = [i for i in items if forward_ops.delete(r, i, settings.claim_timeout)]
    except FallbackError as exc:
        return _failed(exc)
    record("queue forward-delete", {"id": msg_id, "sender": items[0].sender,
                                    "recipients": [i.recipient for i in items]},
           f"ok: {len(done)} recipient(s) deleted")
    return redirect(url_for("console.queue_list", kind=kind, deleted=msg_id))
