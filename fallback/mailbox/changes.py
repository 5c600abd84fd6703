"""The mailbox's change token: what lets the webmail serve a folder page again without
reading it (issue 17: the inbox at the cost of a health check).

`keys.changes(addr)` holds a random token, set anew in the same atomic step (one
MULTI/EXEC or one script) as every write to what a folder page shows: the fields of a
message's record it reads (store.PAGE_ALL_FIELDS) or the record as a whole (`m:<id>`), a
folder's index (`f:<name>`), the unseen set and the list choices.  Reconcile's own fields
(rstate and the rest), the bytes and the message page's fields are not shown in a list.
The folder-page script reads the token with the page (store.folder_page), so a page
drawn from it is exactly the state that token was set with; the webmail keeps it
under the token (web/mailbox.py) and, for the same request again, reads only the token.

A random token rather than a counter: after a failover to a replica that missed the
last writes, or a mailbox deleted and made again, a counter would count the same
numbers again over other contents.  A token is never set twice (64 random bits), and
a state rolled back brings back the token it was written with, so every page kept
under a token shows the state it names.

The writers, each with its own test in tests/test_changes.py (which watches Redis's
MONITOR): deliverscript.py (the receiver), delivery.py (the webmail's and the
queue's writes), store.py (flags, moves, the list choice), bulk.py, expunge.py,
purge.py, drafts.py and queues/delayed.py (undo).
"""

from __future__ import annotations

import secrets
from typing import Any

import redis

from fallback import keys


def token() -> str:
    """A new change token (16 hex digits)."""
    return secrets.token_hex(8)


def queue_touch(pipe: Any, address: str) -> None:
    """Queue a new token on a (sync or async) pipeline: last, after the writes it covers, so
    that even on a pipeline without MULTI no page is kept under it from before them."""
    pipe.set(keys.changes(address), token())


def read(r: redis.Redis, address: str) -> bytes | None:
    """The mailbox's token now; None before its first change (no page is kept under that)."""
    value: Any = r.get(keys.changes(address))
    return value
