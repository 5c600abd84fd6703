"""The rows of a folder page: what each row shows, and the rows' HTML, drawn in one Python pass.

A folder page shows fifty rows of about fifteen values each.  Drawn by a Jinja loop, every
value is an attribute lookup, an `escape()` and a Markup object, and the loop was most of a
drawn page's CPU (issue 17).  Here each row is one format of a plain string: every value that
comes from a mail (sender, subject, the checkbox label, the id) goes through markupsafe's
`escape`, the same function Jinja's autoescaping calls, so the page is byte for byte what the
loop in folder.html drew; the translated labels are put in as Jinja's `_()` puts them
(translations are our own catalogues, trusted as the templates are); the date is
filters.list_times' `<time>` element, built from escaped parts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from flask import url_for
from markupsafe import Markup, escape

from fallback.mailbox import fields
from web import filters, i18n


class Row(NamedTuple):
    """What one list row shows."""

    id: str
    unread: bool
    flagged: bool
    who: str
    subject: str
    pick: str
    attach: bool
    date: Markup
    size: str


def display_rows(rows: list[dict[str, str]]) -> list[Row]:
    """What each list row shows, computed in one Python pass: cheaper than filters per cell."""
    now = time.time()
    # The request's catalogue looked up once, not per text (each Flask-Babel gettext walks its
    # request context).  Named ugettext so that `make translations` still extracts the texts.
    ugettext = i18n.translations().ugettext
    no_subject = ugettext("(no subject)")
    # Translated once, formatted per row (escaped when drawn, names included).
    pick = ugettext("Select message from %(who)s: %(subject)s")
    out = []
    times = filters.list_times([m["ts"] for m in rows], now)
    size = filters.size_texts(ugettext)
    names: dict[str, str] = {}  # a page's senders repeat: each worked out once
    for m, when in zip(rows, times, strict=True):
        flags = m["flags"].split()
        sender = m["to"] if m["kind"] == "sent" else m["from"]
        who = names.get(sender)
        if who is None:
            who = names[sender] = filters.sender_name(sender)
        subject = m["subject"] or no_subject
        out.append(Row(m["id"], fields.SEEN not in flags, fields.FLAGGED in flags, who, subject,
                       pick % {"who": who, "subject": subject}, m["attach"] == "1", when,
                       size(m["size"])))
    return out


def _escaped(values: list[str]) -> list[str]:
    """markupsafe's escape of each value, in one call for the page rather than five a row:
    escaping neither makes nor removes a NUL, so the values joined by NULs and escaped split
    back into the values escaped.  A value holding a NUL itself, or one that is already
    Markup (which escape leaves as it is), sends the page the slow way."""
    joined = "\0".join(values)
    if joined.count("\0") != len(values) - 1 or not set(map(type, values)) <= {str}:
        return [str(escape(v)) for v in values]
    return str(escape(joined)).split("\0")


def _label(text: str) -> str:
    """A constant label as the template's `_()` gives it: the translation, unescaped, through
    Jinja's newstyle `%` (which turns a translator's '%%' into '%')."""
    return text % {}


def draw(rows: Sequence[Row], folder: str, actions: bool, grouped: bool, sizes: Sequence[int]) -> Markup:
    """The `<li>` of every row: opened by its link, picked by its checkbox when the folder has
    bulk actions, deleted by the `#` key (data-delete) outside Trash and Drafts."""
    ugettext = i18n.translations().ugettext  # as in display_rows
    message = url_for("mailbox.message", msg_id="_")[:-1]
    href = escape(url_for("compose.compose_form") + "?draft=" if folder == fields.DRAFTS else message)
    delete = escape(message) if folder not in (fields.TRASH, fields.DRAFTS) else ""
    # Outside the f-strings, where `make translations` finds them.
    t_unread, t_flagged_title, t_flagged = ugettext("Unread,"), ugettext("Flagged"), ugettext("Flagged,")
    t_att_title, t_att = ugettext("Has attachments"), ugettext("att")
    t_count, t_messages = ugettext("Messages in this conversation"), ugettext("messages")
    unread = f'<span class="vh">{_label(t_unread)} </span>'
    flagged = (f'<span class="flag" title="{_label(t_flagged_title)}" aria-hidden="true">★</span>'
               f'<span class="vh">{_label(t_flagged)} </span> ')
    clip = f'<span class="clip" title="{_label(t_att_title)}">{_label(t_att)}</span> '
    count_open = f' <span class="count" title="{_label(t_count)}">'
    count_close = f'<span class="vh"> {_label(t_messages)}</span></span>'
    out = []
    escaped = _escaped([v for m in rows for v in (m.id, m.pick, m.who, m.subject, m.size)])
    for i, m in enumerate(rows):
        msg_id, picked, who, subject, size = escaped[5 * i:5 * i + 5]
        pick = (f'<label class="pick"><input type="checkbox" name="ids" value="{msg_id}"><span class="vh">'
                f"{picked}</span></label>") if actions else ""
        where = f' data-delete="{delete}{msg_id}/delete"' if delete else ""
        marks = (unread if m.unread else "") + (flagged if m.flagged else "")
        more = f"{count_open}{sizes[i]}{count_close}" if grouped and sizes[i] > 1 else ""
        # One row, exactly as folder.html's loop drew it (its whitespace included).
        out.append(
            f'\n  <li class="{"unread" if m.unread else "read"}" data-row{where}>\n    {pick}\n'
            f'    <a href="{href}{msg_id}" data-open>\n'
            f'      <span class="who">{marks}{who}{more}</span>\n'
            f'      <span class="subject">{subject}</span>\n'
            f'      <span class="meta">{clip if m.attach else ""}{m.date} <span class="size">{size}'
            "</span></span>\n    </a>\n  </li>\n")
    return Markup("".join(out))  # noqa: S704 -- each value above is escaped or one of our labels
