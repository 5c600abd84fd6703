"""The people of one mailbox, for address suggestions: whom the user wrote to or heard from here.

Two keys with the mailbox's hash tag: a sorted set of addresses scored by
recency-weighted frequency (every message adds 2^(age/HALF_LIFE), so someone
written to daily outranks someone met once, and a month-old burst fades),
and a small hash of the display name last seen with each address.  The set
keeps the best CAP addresses: past it the lowest-scored are dropped with
their names, so one mailbox's suggestions stay small whatever arrives.

Fed by the conversation index's pass over new messages (threads.catch_up:
a received message's From, a sent one's To and Cc) and by the webmail's
send (Bcc, which no stored copy carries).  `lookup` adds the users of the
mailbox's own domain from the directory's name index (dirindex.py).
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.addresses import normalize_address
from fallback.errors import InputError
from fallback.mailbox import dirindex

CAP = 500                   # addresses kept per mailbox
MAX_RESULTS = 10
MAX_QUERY = 100             # characters of a query; a longer one is refused
NAME_LIMIT = 100            # characters of a display name kept
HALF_LIFE_S = 14 * 86400    # a contact's weight halves in two weeks
EPOCH_S = 1_700_000_000     # weights count from here (2023-11), so they stay far from overflow
_WORD = re.compile(r"[\w']+")


@dataclass(frozen=True)
class Seen:
    """One address met in one message at `ts` (ms)."""

    address: str
    name: str
    ts: int


def weight(ts_ms: int) -> float:
    return float(2 ** ((ts_ms / 1000 - EPOCH_S) / HALF_LIFE_S))


def _normal(address: str) -> str | None:
    if "@" not in address:
        return None
    try:
        return normalize_address(address)
    except InputError:
        return None


def record(r: redis.Redis, address: str, seen: list[Seen]) -> None:
    """Add what was met to the mailbox's contacts, then trim them to CAP."""
    scores: dict[str, float] = {}
    names: dict[Any, Any] = {}
    for s in seen:
        addr = _normal(s.address)
        if addr is None or addr == address:
            continue
        scores[addr] = scores.get(addr, 0.0) + weight(s.ts)
        name = " ".join(s.name.split())[:NAME_LIMIT]
        if name and name.casefold() != addr:
            names[addr] = name
    if not scores:
        return
    key = keys.contacts(address)
    with r.pipeline(transaction=True) as pipe:
        for addr, score in scores.items():
            pipe.zincrby(key, score, addr)
        if names:
            pipe.hset(keys.contact_names(address), mapping=names)
        pipe.zrange(key, 0, -(CAP + 1))  # the ones past the cap, lowest first
        dropped = pipe.execute()[-1]
    if dropped:
        with r.pipeline(transaction=True) as pipe:
            pipe.zrem(key, *dropped)
            pipe.hdel(keys.contact_names(address), *dropped)
            pipe.execute()


def record_sent(r: redis.Redis, address: str, recipients: list[tuple[str, str]], ts_ms: int) -> None:
    """(display name, address) pairs the user just sent to that no stored copy names (Bcc)."""
    record(r, address, [Seen(addr, name, ts_ms) for name, addr in recipients])


def check_query(q: str) -> str:
    """The query as matched (trimmed, case folded); InputError past MAX_QUERY characters."""
    if len(q) > MAX_QUERY:
        raise InputError("suggestion query too long",
                         public=f"Type at most {MAX_QUERY} characters to look up an address.")
    return q.strip().casefold()


def matches(q: str, address: str, name: str) -> bool:
    """Whether `q` (case folded) starts the address, its local part or a word of the name."""
    if address.startswith(q):
        return True
    return any(w.startswith(q) for w in _WORD.findall(name.casefold()))


def lookup(r: redis.Redis, address: str, q: str, directory_domain: str | None) -> list[dict[str, str]]:
    """At most MAX_RESULTS {address, name} for query `q` (already checked), best first: the
    mailbox's own contacts by weight, then the users of `directory_domain` in the directory
    (None: the directory is not offered)."""
    if not q:
        return []
    with r.pipeline(transaction=False) as pipe:
        pipe.zrevrange(keys.contacts(address), 0, -1)
        pipe.hgetall(keys.contact_names(address))
        replies: list[Any] = pipe.execute()
    people = [_text(a) for a in replies[0]]
    names = {_text(k): _text(v) for k, v in replies[1].items()}
    out: list[dict[str, str]] = []
    for addr in people:
        name = names.get(addr, "")
        if matches(q, addr, name):
            out.append({"address": addr, "name": name})
            if len(out) == MAX_RESULTS:
                return out
    if directory_domain is not None:
        listed = {p["address"] for p in out}
        for addr in dirindex.lookup(r, directory_domain, q, MAX_RESULTS + 1):
            if addr not in listed and addr != address and addr.startswith(q):
                out.append({"address": addr, "name": names.get(addr, "")})
                if len(out) == MAX_RESULTS:
                    break
    return out


def formatted(entry: dict[str, str]) -> str:
    """How a suggestion goes into an address field: 'Ann Example <ann@x.org>'."""
    return email.utils.formataddr((entry["name"], entry["address"])) if entry["name"] else entry["address"]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
