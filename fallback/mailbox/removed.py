"""Mailboxes removed from the directory that still hold mail: the registry that keeps them found.

A directory sync (mailbox/sync.py) removes users who left, but the mail they
already hold stays in Redis until reconcile has put it into the main store and
purge has freed it.  Reconcile --all, purge and `fallback status` walk the
directory, which no longer names them, so such mailboxes are remembered here
(`dir:{rN}:removed`, 16 small hashes address -> mailstore, one slot each; no
command spans two).  An entry is written before the directory record goes,
so a crash in between leaves the mailbox findable, and it is dropped once the
mailbox holds nothing or is provisioned again (`prune`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.mailbox.directory import Directory


@dataclass(frozen=True)
class Held:
    address: str
    mailstore: str
    messages: int
    bytes: int


def _by_shard(addresses: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for address in addresses:
        groups.setdefault(keys.removed(address), []).append(address)
    return groups


def message_counts(r: redis.Redis, addresses: list[str], batch: int = 5000) -> dict[str, int]:
    """How many messages each mailbox holds (its info hash), pipelined in batches."""
    out: dict[str, int] = {}
    for start in range(0, len(addresses), batch):
        chunk = addresses[start : start + batch]
        pipe = r.pipeline(transaction=False)
        for address in chunk:
            pipe.hget(keys.info(address), "messages")
        for address, value in zip(chunk, pipe.execute(), strict=True):
            out[address] = int(value or 0)
    return out


def remember(r: redis.Redis, mailboxes: Iterable[tuple[str, str]]) -> None:
    """Record (address, mailstore) pairs: one HSET per shard."""
    groups: dict[str, dict[Any, Any]] = {}
    for address, mailstore in mailboxes:
        groups.setdefault(keys.removed(address), {})[address] = mailstore
    if not groups:
        return
    pipe = r.pipeline(transaction=False)
    for shard, mapping in groups.items():
        pipe.hset(shard, mapping=mapping)
    pipe.execute()


def forget(r: redis.Redis, addresses: Iterable[str]) -> None:
    groups = _by_shard(addresses)
    if not groups:
        return
    pipe = r.pipeline(transaction=False)
    for shard, members in groups.items():
        pipe.hdel(shard, *members)
    pipe.execute()


def entries(r: redis.Redis) -> dict[str, str]:
    """Every remembered address with its mailstore."""
    pipe = r.pipeline(transaction=False)
    for n in range(keys.REMOVED_SHARDS):
        pipe.hgetall(keys.removed_n(n))
    out: dict[str, str] = {}
    for shard in pipe.execute():
        out.update((k.decode(), v.decode()) for k, v in shard.items())
    return out


def addresses(r: redis.Redis, mailstore: str | None = None) -> Iterator[str]:
    """The remembered addresses (of one mailstore when given), for reconcile and purge."""
    for address, store in sorted(entries(r).items()):
        if mailstore is None or store == mailstore:
            yield address


def held(r: redis.Redis, provisioned: Directory) -> list[Held]:
    """Remembered mailboxes that still hold mail and are not provisioned again, by address."""
    known = entries(r)
    if not known:
        return []
    names = sorted(known)
    back = provisioned.get_many(names)
    pipe = r.pipeline(transaction=False)
    for address in names:
        pipe.hmget(keys.info(address), ["messages", "bytes"])
    out = []
    for address, again, (messages, size) in zip(names, back, pipe.execute(), strict=True):
        if again is None and int(messages or 0) > 0:
            out.append(Held(address, known[address], int(messages), int(size or 0)))
    return out


def prune(r: redis.Redis, provisioned: Directory) -> int:
    """Drop the entries of mailboxes that hold nothing any more or are provisioned again."""
    known = entries(r)
    if not known:
        return 0
    still = {h.address for h in held(r, provisioned)}
    gone = [a for a in known if a not in still]
    forget(r, gone)
    return len(gone)
