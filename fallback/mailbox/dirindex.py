"""The directory's name index: a domain's provisioned local parts, found by prefix as a user types.

The directory itself (directory.py) is bucketed by a hash of the address, so
a domain's users are spread over every bucket and a prefix lookup there
would read all of them.  This index buckets them by the first PREFIX
characters of the local part instead: one small hash per (domain, prefix)
(keys.dir_names; small hashes stay listpack-encoded, a few bytes per name,
like the directory's own buckets), and per domain a sorted set of the
prefixes in use (keys.dir_name_prefixes, read by lex range).  A query of
PREFIX characters or more reads one bucket; a shorter one reads the first
SHORT_BUCKETS buckets its prefix range names.  Each key has its own hash
tag, so a large domain spreads over a cluster.

Written by the directory's own writes (Directory.put_many, remove,
remove_many: provision, sync, LDAP), in the same pipeline.  A directory
provisioned before this index existed gets it at the start of the next
`fallback provision` run (`ensure`: once, marked by keys.DIR_NAMES_BUILT).  A prefix whose names
were all removed stays listed (an empty bucket reads as nothing).
Measured in docs/performance.md, "Issue 15: conversations and suggestions".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import redis

from fallback import keys

PREFIX = 3          # characters of the local part that choose its bucket
SHORT_BUCKETS = 4   # buckets a query shorter than PREFIX looks into (the first in order)


def _split(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain


def queue_add(pipe: Any, addresses: Iterable[str]) -> None:
    groups: dict[tuple[str, str], dict[Any, Any]] = {}
    for address in addresses:
        local, domain = _split(address)
        if local:
            groups.setdefault((domain, local[:PREFIX]), {})[local] = ""
    prefixes: dict[str, dict[Any, Any]] = {}
    for (domain, prefix), names in groups.items():
        pipe.hset(keys.dir_names(domain, prefix), mapping=names)
        prefixes.setdefault(domain, {})[prefix] = 0
    for domain, members in prefixes.items():
        pipe.zadd(keys.dir_name_prefixes(domain), members)


def queue_remove(pipe: Any, addresses: Iterable[str]) -> None:
    groups: dict[tuple[str, str], list[str]] = {}
    for address in addresses:
        local, domain = _split(address)
        if local:
            groups.setdefault((domain, local[:PREFIX]), []).append(local)
    for (domain, prefix), names in groups.items():
        pipe.hdel(keys.dir_names(domain, prefix), *names)


def lookup(r: redis.Redis, domain: str, q: str, limit: int) -> list[str]:
    """Up to `limit` addresses of `domain` whose local part starts with `q`'s part before any
    "@" (case folded already), in byte order of the local part."""
    local = q.partition("@")[0]
    if not local:
        return []
    if len(local) >= PREFIX:
        buckets = [local[:PREFIX]]
    else:
        # "\xff" sorts after every byte of UTF-8: [q, q\xff] is "starts with q".
        found: Any = r.zrange(keys.dir_name_prefixes(domain), f"[{local}".encode(),
                              b"[" + local.encode() + b"\xff", bylex=True, offset=0, num=SHORT_BUCKETS)
        buckets = [p.decode("utf-8", "replace") for p in found]
    if not buckets:
        return []
    with r.pipeline(transaction=False) as pipe:
        for prefix in buckets:
            pipe.hkeys(keys.dir_names(domain, prefix))
        replies = pipe.execute()
    names = sorted(n.decode("utf-8", "replace") for reply in replies for n in reply)
    return [f"{n}@{domain}" for n in names if n.startswith(local)][:limit]


def ensure(r: redis.Redis, all_addresses: Iterable[str]) -> int | None:
    """Build the index over the whole directory once (a directory provisioned before the index
    existed); None when it was built already, else how many addresses it took."""
    if r.exists(keys.DIR_NAMES_BUILT):
        return None
    n = rebuild(r, all_addresses)
    r.set(keys.DIR_NAMES_BUILT, str(int(time.time())))
    return n


def rebuild(r: redis.Redis, all_addresses: Iterable[str], batch: int = 5000) -> int:
    """Add every address given (Directory.iter_mailboxes) to the index; how many."""
    n = 0
    chunk: list[str] = []
    for address in all_addresses:
        chunk.append(address)
        if len(chunk) >= batch:
            n += _flush(r, chunk)
            chunk = []
    return n + (_flush(r, chunk) if chunk else 0)


def _flush(r: redis.Redis, chunk: list[str]) -> int:
    with r.pipeline(transaction=False) as pipe:
        queue_add(pipe, chunk)
        pipe.execute()
    return len(chunk)
