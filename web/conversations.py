"""Conversations in the webmail: the list on the message page and the folder list grouped by them.

The index itself (which messages belong together, INBOX, Sent and Trash
alike) is fallback/mailbox/threads.py; this reads it for a page.  Whether a
folder list is grouped is the user's own choice, a POST of the toggle form
(with the CSRF token) remembered in Redis (keys.list_prefs), so it follows
the user across log-ins and devices; `?group=1` or `?group=0` in the URL
shows one page either way without changing it.
"""

from __future__ import annotations

import contextlib
import email
import html
import time
from email.message import Message
from typing import Any

import nh3
from flask import Blueprint, abort, g, redirect, request, url_for
from flask_babel import gettext

from fallback import keys
from fallback.mailbox import compression, fields, record, store, threads
from web import filters
from web.auth import login_required
from web.context import state

bp = Blueprint("conversations", __name__)

SNIPPET_BYTES = 8192    # of each message read for its first line: a conversation costs the same for big mail
SNIPPET_CHARS = 120
GROUP_SCAN = store.SEARCH_LIMIT  # newest messages of a folder the grouped list looks at
FOLDER_LABELS = {fields.INBOX: "Inbox", fields.SENT: "Sent", fields.TRASH: "Trash"}
GROUPED = {"inbox": fields.INBOX, "sent": fields.SENT, "trash": fields.TRASH}  # folders in the index

# One round trip for a conversation: each message's list fields and the start of its bytes.
# The start of the bytes through record.LUA's raw_head (any layout; zstd: a whole block).
_ROWS_LUA = record.LUA + """
local out = {}
for i = 5, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local row = redis.call('HMGET', key, 'ts', 'from', 'to', 'subject', 'kind', 'folder', 'flags', 'm')
  row[#row + 1] = raw_head(key, tonumber(ARGV[2]), tonumber(ARGV[4]), ARGV[3])
  out[#out + 1] = row
end
return out
"""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


def for_message(msg_id: str, current: tuple[list[str], int] | None = None) -> dict[str, Any]:
    """The message page's conversation: {rows, total, hidden}; rows oldest first, the shown
    message marked `current`.  A conversation of one message has no rows.  `current`: the
    conversation's (ids, total) when the caller read them already (store.message_page)."""
    r = state().r
    ids, total = threads.current_conversation(r, g.user, msg_id) if current is None else current
    if total <= 1:
        return {"rows": [], "total": total, "hidden": 0}
    script = r.register_script(_ROWS_LUA)
    # The key names the mailbox's slot; the message keys are built from the prefix there.
    values: Any = script(keys=[keys.info(g.user)],
                         args=[keys.message(g.user, ""), SNIPPET_BYTES, compression.MAGIC,
                               compression.BLOCK_STORED, *ids])
    now = time.time()
    rows, gone, stamps = [], [], []
    for i, v in zip(ids, values, strict=True):
        if v[0] is None:
            gone.append(i)  # deleted for good since it was indexed
            continue
        # Either layout of the record (issue 17): display values packed in 'm', or one field each.
        names = (fields.TS, fields.FROM, fields.TO, fields.SUBJECT, fields.KIND, fields.FOLDER, fields.FLAGS,
                 fields.PACKED)
        row = {**dict.fromkeys(names, ""), **record.decode(names, v[:8])}
        ts, sender, to, subject, kind, folder, flags = (row[n] for n in names[:7])
        stamps.append(ts)
        rows.append({
            "id": i, "current": i == msg_id, "sent": kind == "sent",
            "who": filters.sender_name(to if kind == "sent" else sender),
            "subject": subject or gettext("(no subject)"),
            "folder": FOLDER_LABELS.get(folder, folder), "unread": fields.SEEN not in flags.split(),
            "snippet": first_line(compression.unpack_prefix(v[8], SNIPPET_BYTES)
                                  if isinstance(v[8], bytes) else b""),
        })
    # All the rows' dates at once: Babel once per day, not twice per row (issue 17).
    for shown, when in zip(rows, filters.list_times(stamps, now), strict=True):
        shown["date"] = when
    threads.forget(r, g.user, gone)
    return {"rows": rows, "total": total - len(gone), "hidden": max(0, total - len(ids))}


def first_line(head: bytes) -> str:
    """The first line of text of a message, from the start of its bytes; never raises.

    The email package's compat32 parser: a twentieth of the cost of the modern
    policy, and a conversation parses up to CONVERSATION_LIMIT messages a page."""
    with contextlib.suppress(Exception):
        text = _text_of(email.message_from_bytes(head))
        for line in text.splitlines():
            line = " ".join(line.split())
            if line and not line.startswith(">"):
                return line[:SNIPPET_CHARS]
    return ""


def _decoded(part: Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")


def _text_of(msg: Message) -> str:
    html_part = None
    for part in msg.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            return _decoded(part)
        if ctype == "text/html" and html_part is None:
            html_part = part
    if html_part is None:
        return ""
    return html.unescape(nh3.clean(_decoded(html_part), tags=set()))


# -- the folder list, grouped -------------------------------------------------------------------------


def grouping(folder: str) -> bool:
    """Whether this view of the folder is grouped: ?group= for this page, else the user's choice."""
    asked = request.args.get("group")
    if asked in ("0", "1"):
        return asked == "1"
    return state().r.hget(keys.list_prefs(g.user), "group") == b"1"


def grouped_page(folder: str, start: int, count: int) -> tuple[int, list[dict[str, str]], list[int]]:
    """(conversations in the folder, the newest message of each of `count` of them from `start`,
    how many messages each conversation has across folders)."""
    r = state().r
    threads.catch_up(r, g.user)
    groups = threads.group_ids(r, g.user, folder, GROUP_SCAN)
    page = groups[start : start + count]
    rows = store.summaries(r, g.user, [ids[0] for _, ids in page])
    sizes = threads.sizes(r, g.user, [tid for tid, _ in page])
    by_id = dict(zip((ids[0] for _, ids in page), zip(sizes, (len(ids) for _, ids in page),
                                                        strict=True), strict=True))
    counts = [max(by_id[row["id"]]) for row in rows]  # not indexed yet: its messages here
    return len(groups), rows, counts


@bp.post("/folder/<name>/group")
@login_required
def set_grouping(name: str) -> Any:
    """The toggle: remember the user's choice, back to the folder's first page."""
    folder = GROUPED.get(name.lower())
    if folder is None:
        abort(404)
    on = request.form.get("group") == "1"
    store.set_grouping(state().r, g.user, on)
    target = url_for("mailbox.inbox") if folder == fields.INBOX else url_for("mailbox.folder",
                                                                             name=name.lower())
    return redirect(target)
