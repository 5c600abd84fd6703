"""Rendered pages kept for the next request that would draw exactly the same page (issue 17:
a folder or message page at about the cost of a health check).

A page is a function of what it shows: the view's data (the rows of a folder page as the
store returned them, a message's record and a digest of its bytes) and the request's own
inputs that base.html reads (the user, the path with its query, the language, the time zone
and today's date in it, the incident texts, the restored banner).  The cache key is all of
those, compared in full (the message's bytes by a 128-bit BLAKE2 digest), so an entry can never be shown for a
page whose data changed: new mail, a flag, a move changes the rows and so the key.  Nothing
needs invalidating, and a stale entry is only memory, dropped least recently used.  A plain
folder page's data is said by something smaller: the mailbox's change token read with its
rows (fallback/mailbox/changes.py), which every change to them replaces; it is kept under
that, so serving it again reads only the token.

Two values differ on every response and are never part of an entry: the CSP nonce and the
session's CSRF token.  A page is drawn with marks in their place (random per process and
never sent, so no mail can contain one) and each response gets the request's own values written in
(web/mailbox.py's `_cached_page`, which also adds the request's inputs to the key).  A page
is kept as its UTF-8 bytes cut at the marks, so serving it again is one join: no encoding and
no search through the page (issue 17).

Bounded by the bytes of the kept pages (`--web-page-cache` per worker process; 0: off;
the keys, a folder page's row values, add up to about half as much again); a page over an
eighth of it is never kept.  One lock: gunicorn runs several threads per worker.

`Kept` is the bounded store under it, also holding each message's parsed and sanitised body
(web/render.py's `Rendered`, a function of the message's bytes, its remote-content choice and
the webmail's host names, all in its key): the message page and its frame's /body request
parse a message once, and a message page drawn again for another reason (a flag, another
language) does not parse it again.  Those are bounded by a quarter of `--web-page-cache` more
(about the characters of their text and HTML), off with it at 0.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


# The values a key holds as they are, by exact type: most of a page's context (issue 17).
_PLAIN = frozenset((str, int, float, bool, type(None), bytes))


def freeze(value: Any) -> Hashable:
    """The view's data as a key: dicts, lists and tuples become tuples, recursively; str
    (Markup included), numbers, bools and None stay as they are."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, dict):
        return tuple([(k, freeze(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return tuple([freeze(v) for v in value])
    if isinstance(value, (str, int, float, bool, type(None), bytes, frozenset)):
        return value
    raise TypeError(f"cannot key a page on {type(value).__name__}")


class Kept(Generic[V]):
    """Least recently used values, bounded by the sum of their `size`s; a value over an eighth
    of the limit is never kept.  One lock: gunicorn runs several threads per worker."""

    def __init__(self, limit: int, size: Callable[[V], int]) -> None:
        self.limit = limit
        self.largest = limit // 8
        self.size = size
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._values: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            found = self._values.get(key)
            if found is None:
                self.misses += 1
                return None
            self._values.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self.size(value)
        if size > self.largest:
            return
        with self._lock:
            old = self._values.pop(key, None)
            if old is not None:
                self.used -= old[1]
            self._values[key] = (value, size)
            self.used += size
            while self.used > self.limit:
                _, (_, dropped) = self._values.popitem(last=False)
                self.used -= dropped


# A kept page: its UTF-8 bytes cut at the nonce marks, each piece cut at the CSRF marks.
Pieces = tuple[tuple[bytes, ...], ...]


def _size(pieces: Pieces) -> int:
    return sum(len(b) for piece in pieces for b in piece)


class PageCache(Kept[Pieces]):
    """Drawn pages, bounded by the bytes of their text."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(limit_bytes, _size)
        token = secrets.token_hex(12)
        self.nonce_mark = f"nonce{token}"
        self.csrf_mark = f"csrf{token}"

    def cut(self, page: str) -> Pieces:
        """A page drawn with the marks, as it is kept.  The marks are ASCII, and no UTF-8
        sequence holds an ASCII byte that is not that character: the same places as in the
        text.  Neither mark can overlap the other (hex token, letters outside it)."""
        csrf = self.csrf_mark.encode()
        return tuple(tuple(piece.split(csrf)) for piece in page.encode().split(self.nonce_mark.encode()))

    def fill(self, pieces: Pieces, nonce: str, csrf: str) -> bytes:
        """A kept page with this response's nonce and CSRF token, as the response's bytes."""
        token = csrf.encode()
        return nonce.encode().join([token.join(piece) for piece in pieces])
