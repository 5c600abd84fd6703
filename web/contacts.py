"""Address suggestions for compose: `GET /contacts?q=PREFIX`, JSON for web/static/suggest.js.

The answer is `[{"address": ..., "name": ...}, ...]`, at most ten, best first:
the people the user wrote to or heard from here (mailbox/contacts.py), then,
with --contacts-directory, the users of the user's own mail domain in the
directory, never another domain's.  Called as the user types, so its cost is
bounded: the query is at most contacts.MAX_QUERY characters, the mailbox's
contacts at most contacts.CAP, the directory read one prefix range.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request
from flask_babel import lazy_gettext

from fallback.errors import InputError
from fallback.mailbox import contacts, threads
from web import i18n
from web.context import state

bp = Blueprint("contacts", __name__)

# What a person (or the script, which shows nothing for them) reads besides the list.
NOT_LOGGED_IN = lazy_gettext("Log in again to get address suggestions.")


@bp.get("/contacts")
def suggest() -> Any:
    if g.user is None:
        return _json({"error": str(NOT_LOGGED_IN)}, 401)
    try:
        q = contacts.check_query(request.args.get("q", ""))
    except InputError as exc:
        return _json({"error": i18n.public_text(exc)}, 400)
    if not q:
        return _json([], 200)
    st = state()
    threads.catch_up(st.r, g.user)  # the senders of mail that came since the last look
    domain = g.user.rpartition("@")[2] if st.settings.contacts_directory else None
    return _json(contacts.lookup(st.r, g.user, q, domain), 200)


def _json(body: Any, status: int) -> Any:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"  # one user's people: never in a shared cache
    return response
