"""Folders and messages: the list, one message, its frame, source and attachments, and actions.

Every lookup goes through the logged-in user's own keys (`mbx:{user}:...`),
so another user's message id simply is not found: 404, never a leak.  Flag
and folder changes go through store.set_flags / store.move, which also mark
the message for reconcile.

Remote images load only after the user pressed "Show remote content" on the
message page: a POST with the session's CSRF token, recorded in the message's
own record (fields.REMOTE), so nothing inside a mail (a link, a query string
such as `?remote=1`) can turn them on.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Hashable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, g, redirect, render_template, request, send_file, url_for
from flask_babel import gettext
from werkzeug.exceptions import BadRequest

from fallback import keys
from fallback.ids import is_id
from fallback.mailbox import changes, fields, store
from fallback.maillog import MailLog
from fallback.ops.metrics import MailCounters
from fallback.queues import outbound
from web import bulk, conversations, folderlist, i18n, prefs, render
from web.auth import login_required, mailbox_restored
from web.context import state
from web.pagecache import freeze
from web.pages import live_incident
from web.security import frame_csp, frameable

bp = Blueprint("mailbox", __name__)

PAGE_SIZE = 50
FOLDER_NAMES = {"inbox": fields.INBOX, "sent": fields.SENT, "drafts": fields.DRAFTS, "trash": fields.TRASH}
_TOKEN = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}$")
# Only on a message that exists: a HSET alone would make a record of a deleted one.
_ALLOW_REMOTE = "if redis.call('EXISTS', KEYS[1]) == 1 then " \
                "return redis.call('HSET', KEYS[1], ARGV[1], '1') + 1 end return 0"


def folder_of(name: str) -> str:
    folder = FOLDER_NAMES.get(name.lower())
    if folder is None:
        abort(404)
    return folder


def raw_or_404(msg_id: str) -> bytes:
    """The logged-in user's message bytes; 404 for a bad id or another user's message."""
    if not is_id(msg_id):
        abort(404)
    raw = store.MailboxReader(state().r, g.user).raw(msg_id)
    if raw is None:
        abort(404)
    return raw


def _meta_or_404(msg_id: str) -> dict[str, str]:
    if not is_id(msg_id):
        abort(404)
    meta = store.MailboxReader(state().r, g.user).meta(msg_id)
    if meta is None:
        abort(404)
    return meta


def _page(args: Mapping[str, str]) -> int:
    try:
        return max(1, min(int(args.get("page", "1")), 100000))
    except ValueError:
        return 1


@bp.get("/")
@login_required
def inbox() -> Any:
    return _folder_view(fields.INBOX)


@bp.get("/folder/<name>")
@login_required
def folder(name: str) -> Any:
    return _folder_view(folder_of(name))


def _folder_view(folder: str) -> Any:
    r = state().r
    # A plain dict: werkzeug's MultiDict.get makes an exception for each name not given (issue 17).
    args = request.args.to_dict()
    page = _page(args)
    query = args.get("q", "").strip()[:200]
    start = (page - 1) * PAGE_SIZE
    can_group = folder in conversations.GROUPED.values()
    asked = args.get("group")  # ?group=0|1 for this page, else the user's choice
    listed = None
    plain = not query and asked not in ("0", "1")  # the page the folder's link opens
    # The request's inputs, worked out once: the key served from and the key kept under.
    inputs = _request_inputs() if plain and state().pages.limit > 0 else None
    if plain:
        # Served again: a list page is kept under the mailbox's change token, which every
        # change to what it shows replaces (fallback/mailbox/changes.py), so for the same
        # request under the same token it is this page: one GET instead of the page's reads.
        token = changes.read(r, g.user) if inputs is not None else None
        if token:
            kept = _kept(("folder.html", token, inputs))
            if kept is not None:
                return kept
        # The page, the unread counts, the user's grouping choice and the token: one round trip.
        listed = store.folder_page(r, g.user, folder, start, PAGE_SIZE)
    grouped = not query and can_group and (asked == "1" if listed is None else listed.grouped)
    sizes: list[int] = []
    more = False  # a search with more matches than it counts (search.COUNT_LIMIT)
    if grouped:  # issue 15: one row per conversation (web/conversations.py)
        total, rows, sizes = conversations.grouped_page(folder, start, PAGE_SIZE)
        counts = store.unread_counts(r, g.user)
        data: Any = tuple(tuple(m.values()) for m in rows)
        rows_of = rows.copy
    elif query:
        total, more, rows = store.search(r, g.user, folder, query, start, PAGE_SIZE)
        counts = store.unread_counts(r, g.user)
        data = tuple(tuple(m.values()) for m in rows)
        rows_of = rows.copy
    else:
        if listed is None:
            listed = store.folder_page(r, g.user, folder, start, PAGE_SIZE)
        total, counts, data, rows_of = listed.total, listed.counts, listed.data, listed.rows
    pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE) + (1 if more else 0)
    context = dict(
        folder=folder, total=total, page=page, pages=pages,
        query=query, more=more, grouped=grouped, sizes=sizes, can_group=can_group,
        unread=counts.get(fields.INBOX, 0), unread_counts=counts, folders=fields.FOLDERS,
        notice=bulk.notice(args), actions=bulk.offered(folder),
    )

    # The rows' values as the store returned them are the page's data (web/pagecache.py), or
    # for a plain list page the change token read with them; only a page not drawn before
    # decodes them and works out what each row shows.
    key = None
    if inputs is not None and not grouped and listed is not None and listed.token:
        key = ("folder.html", listed.token, inputs)
    return _cached_page("folder.html", data, context, lambda: _drawn_rows(rows_of(), context), key)


def _drawn_rows(rows: list[dict[str, str]], context: dict[str, Any]) -> dict[str, Any]:
    """The rows as folder.html shows them: `rows` for its tests, `rows_html` for the list."""
    shown = folderlist.display_rows(rows)
    return {"rows": shown, "rows_html": folderlist.draw(shown, context["folder"], bool(context["actions"]),
                                                        context["grouped"], context["sizes"])}


@bp.get("/message/<msg_id>")
@login_required
def message(msg_id: str) -> Any:
    # The message and its conversation in one round trip.
    found = store.MailboxReader(state().r, g.user).message_page(msg_id) if is_id(msg_id) else None
    if found is None:
        abort(404)
    meta, raw, current = found
    r = state().r
    flags = meta.get("flags", "").split()
    if fields.SEEN not in flags:
        store.set_flags(r, g.user, msg_id, add=(fields.SEEN,))
        flags.append(fields.SEEN)
    remote = meta.get(fields.REMOTE) == "1"
    hosts = own_hosts()
    context = dict(
        msg_id=msg_id, meta=meta, flags=flags, remote=remote,
        delivery=_delivery_status(msg_id, meta) if meta.get("kind") == "sent" else [],
        folder=meta.get("folder", fields.INBOX), sent=request.args.get("sent"),
        conversation=conversations.for_message(msg_id, current),
    )
    # The message's bytes (by digest) and where links may point are what the body is drawn from.
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    data = (digest, hosts)
    return _cached_page("message.html", data, context,
                        lambda: {"m": rendered(msg_id, raw, digest, remote, hosts)})


def rendered(msg_id: str, raw: bytes, digest: bytes, remote: bool, hosts: frozenset[str]) -> render.Rendered:
    """render.render(raw, remote, hosts), parsed once for the message page and its frame:
    kept under everything it is drawn from (the bytes by their `digest`), and the user's
    message id, so no entry is ever shared between mailboxes."""
    kept = state().renders
    key = (g.user, msg_id, digest, remote, hosts)
    shown = kept.get(key)
    if shown is None:
        shown = render.render(raw, remote=remote, own_hosts=hosts)
        kept.put(key, shown)  # at 0 (off) nothing is kept: every value is over its limit
    return shown


def _kept(key: Hashable) -> bytes | None:
    """The page kept under `key`, with this response's nonce and token; None if there is none."""
    cache = state().pages
    pieces = cache.get(key) if cache.limit > 0 else None
    return None if pieces is None else cache.fill(pieces, g.nonce, g.session.csrf)


def _cached_page(template: str, data: Hashable, context: dict[str, Any],
                 late: Callable[[], dict[str, Any]], key: Hashable | None = None) -> str | bytes:
    """render_template(template, **context, **late()), or the same page drawn before for the
    same `data`, `context` and request inputs (web/pagecache.py says why that is always right),
    as its UTF-8 bytes.  `late` is what only a miss needs to compute, from `data`'s source.
    `key`: the key to keep it under instead, when something smaller says all of that (a list
    page's change token with the request's inputs)."""
    cache = state().pages
    if key is None:
        try:
            key = (template, data, freeze(context), _request_inputs())
        except TypeError:  # a value the key cannot hold: draw it, as without the cache
            key = None
    if cache.limit <= 0 or key is None:
        return render_template(template, **context, **late())
    pieces = cache.get(key)
    if pieces is None:
        pieces = cache.cut(render_template(template, **context, **late(),
                                           csp_nonce=cache.nonce_mark, csrf_token=cache.csrf_mark))
        cache.put(key, pieces)
    return cache.fill(pieces, g.nonce, g.session.csrf)


def _request_inputs() -> tuple[Any, ...]:
    """What base.html and the filters read from the request rather than from the view: the
    user, the path and query (the language switcher's `next`), the language, the time zone and
    today's date there (today's mail shows the time, older the date), the banners."""
    zone = prefs.current_zone()
    return (g.user, request.method, request.full_path, i18n.select_locale(), zone.name, zone.known,
            datetime.now(zone.tz).date(), live_incident(), mailbox_restored())


def _delivery_status(msg_id: str, meta: dict[str, str]) -> list[dict[str, Any]]:
    """One row per recipient: delivered here at once, or the outbound queue's state."""
    rows: list[dict[str, Any]] = [
        {"rcpt": a, "state": "delivered", "reply": gettext("Delivered to the mailbox here"), "next": 0}
        for a in meta.get("local", "").split()
    ]
    for rcpt, status in sorted(outbound.recipient_status(state().r, g.user, msg_id).items()):
        rows.append({"rcpt": rcpt, **status})
    return rows


@bp.get("/message/<msg_id>/body")
@login_required
@frameable
def body(msg_id: str) -> Any:
    """The sanitised HTML part, shown in the message page's sandboxed frame."""
    found = store.MailboxReader(state().r, g.user).message(msg_id) if is_id(msg_id) else None
    if found is None:
        abort(404)
    meta, raw = found
    remote = meta.get(fields.REMOTE) == "1"
    shown = rendered(msg_id, raw, hashlib.blake2b(raw, digest_size=16).digest(), remote, own_hosts())
    if shown.html is None:
        abort(404)
    response = Response(render_template("frame.html", html=shown.html), mimetype="text/html")
    response.headers["Content-Security-Policy"] = frame_csp(remote)
    return response


def own_hosts() -> frozenset[str]:
    """The webmail's host names, as this request reached it and as users are told to type it:
    a URL in a mail that names one of them would act inside the webmail.  Worked out once per
    Host header (the settings' URL is the app's for good): every message page asks (issue 17)."""
    known = state().hosts
    found = known.get(request.host)
    if found is None:
        names = {request.host, urlsplit(state().settings.webmail_url or "").netloc}
        found = frozenset(h for h in (render.url_host(n) for n in names if n) if h)
        known.put(request.host, found)
    return found


@bp.post("/message/<msg_id>/remote")
@login_required
def remote(msg_id: str) -> Any:
    """Load this message's remote images from now on: the user's own choice on the message
    page (the POST carries the session's CSRF token, checked in web.security)."""
    if not is_id(msg_id):
        abort(404)
    if not state().r.eval(_ALLOW_REMOTE, 1, keys.message(g.user, msg_id), fields.REMOTE):
        abort(404)
    return redirect(url_for("mailbox.message", msg_id=msg_id))


@bp.get("/message/<msg_id>/source")
@login_required
def source(msg_id: str) -> Any:
    raw = raw_or_404(msg_id)
    response = Response(raw.decode("utf-8", "replace"), mimetype="text/plain")
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


@bp.get("/message/<msg_id>/part/<int:index>")
@login_required
def part(msg_id: str, index: int) -> Any:
    raw = raw_or_404(msg_id)
    found = render.attachment_payload(raw, index)
    if found is None:
        abort(404)
    filename, ctype, data = found
    mimetype = ctype if _TOKEN.match(ctype) else "application/octet-stream"
    response = send_file(io.BytesIO(data), mimetype=mimetype, as_attachment=True,
                         download_name=filename.replace("/", "_").replace("\\", "_") or "attachment")
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def _back(default: str) -> str:
    """Where to go after an action: a local path from the form, never another site."""
    target = request.form.get("next", "")
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


@bp.post("/message/<msg_id>/flags")
@login_required
def flags(msg_id: str) -> Any:
    if not is_id(msg_id):
        abort(404)
    changes = {
        "read": ((fields.SEEN,), ()), "unread": ((), (fields.SEEN,)),
        "flag": ((fields.FLAGGED,), ()), "unflag": ((), (fields.FLAGGED,)),
    }
    action = request.form.get("action", "")
    if action not in changes:
        abort(400)
    add, remove = changes[action]
    if not store.set_flags(state().r, g.user, msg_id, add=add, remove=remove):
        abort(404)
    return redirect(_back(url_for("mailbox.message", msg_id=msg_id)))


@bp.post("/message/<msg_id>/delete")
@login_required
def delete(msg_id: str) -> Any:
    meta = _meta_or_404(msg_id)
    store.move(state().r, g.user, msg_id, fields.TRASH)
    source_folder = meta.get("folder", fields.INBOX)
    return redirect(_back(_folder_url(source_folder)))


@bp.post("/message/<msg_id>/restore")
@login_required
def restore(msg_id: str) -> Any:
    meta = _meta_or_404(msg_id)
    target = fields.SENT if meta.get("kind") == "sent" else fields.INBOX
    store.move(state().r, g.user, msg_id, target)
    return redirect(_back(_folder_url(fields.TRASH)))


def _folder_url(folder: str) -> str:
    return url_for("mailbox.inbox") if folder == fields.INBOX else url_for(
        "mailbox.folder", name=folder.lower())


# -- bulk actions (web/bulk.py) and Empty Trash -------------------------------------------------------


def _folder_page(folder: str, **extra: str | int) -> str:
    """The folder page the form came from (its page number and search kept), with `extra`."""
    args: dict[str, str | int] = {}
    page, query = request.form.get("page", ""), request.form.get("q", "").strip()[:200]
    if page.isdigit() and page != "1":
        args["page"] = min(int(page), 100000)
    if query:
        args["q"] = query
    args.update(extra)
    if folder == fields.INBOX:
        return url_for("mailbox.inbox", **args)  # type: ignore[arg-type]
    return url_for("mailbox.folder", name=folder.lower(), **args)  # type: ignore[arg-type]


def _selected() -> tuple[list[str], int]:
    named = request.form.getlist("ids")
    try:
        return bulk.selected_ids(named)
    except bulk.TooMany as exc:
        # A limit: in the mail log, so /metrics counts it (event=rejected, outcome=400).
        MailLog(counters=MailCounters(state().counters)).rejected(
            None, g.user, g.user, outcome="400",
            reason=f"bulk action: {len(named)} ids, at most {bulk.MAX_IDS} per request")
        raise BadRequest(str(exc)) from None


@bp.post("/folder/<name>/bulk")
@login_required
def bulk_action(name: str) -> Any:
    folder = folder_of(name)
    action = request.form.get("action", "")
    if not bulk.accepts(folder, action):
        raise BadRequest(str(bulk.TEXT["trash_only" if action == "expunge" else "bad_action"]))
    ids, bad = _selected()
    if not ids and not bad:
        return redirect(_folder_page(folder, done="none"))
    if action == "expunge":  # deleting for good asks first; the confirmed POST is expunge_confirmed
        named = list(dict.fromkeys(request.form.getlist("ids")))  # the unknown ones too: counted after
        return render_template("confirm.html", what="selected", ids=named, count=len(named),
                               action=url_for("mailbox.expunge_confirmed"),
                               page=request.form.get("page", ""), query=request.form.get("q", ""))
    result = bulk.apply(state().r, g.user, folder, action, ids, bad)
    return redirect(_folder_page(folder, **result.query()))


@bp.post("/folder/trash/expunge")
@login_required
def expunge_confirmed() -> Any:
    ids, bad = _selected()
    if not ids and not bad:
        return redirect(_folder_page(fields.TRASH, done="none"))
    result = bulk.apply(state().r, g.user, fields.TRASH, "expunge", ids, bad)
    return redirect(_folder_page(fields.TRASH, **result.query()))


@bp.get("/folder/trash/empty")
@login_required
def empty_trash_form() -> Any:
    count = store.MailboxReader(state().r, g.user).count(fields.TRASH)
    return render_template("confirm.html", what="all", ids=[], count=count,
                           action=url_for("mailbox.empty_trash"), page="", query="")


@bp.post("/folder/trash/empty")
@login_required
def empty_trash() -> Any:
    result = bulk.empty_trash(state().r, g.user)
    return redirect(_folder_page(fields.TRASH, **result.query()))
