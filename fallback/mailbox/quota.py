"""The per-mailbox quota: what a mailbox holds against `mailbox_quota`, and who hit it.

Usage is the `bytes` counter of the mailbox's info hash (keys.info): the
sizes of every message it holds, in every folder (received, Sent copies,
notices), exactly the bytes reconcile will append to the main store (our
Received: line and the message as the sender sent it), so what the main
store's quota will count.  The delivery script adds to it in the same step
as it stores a message and refuses there (deliverscript.py); purge takes off
what it deletes.  Only the SMTP receiver refuses at the quota: the
webmail's own writes (Sent copies, mail between local users) are counted but
never refused, so users can still send while their mailbox is full.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.mailbox.ttlcache import TtlCache

REFUSED_KEPT = 86400.0  # how long a refusal stays listed in `fallback status`
_GIB, _MIB, _KIB = 1024**3, 1024**2, 1024


def human(size: int) -> str:
    """1288490188 -> "1.2 GiB"; whole numbers without decimals ("2 GiB")."""
    for unit, name in ((_GIB, "GiB"), (_MIB, "MiB"), (_KIB, "KiB")):
        if size >= unit:
            value = size / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{size} bytes"


def describe(used: int, quota: int) -> str:
    """"1.2 GiB of 2 GiB (60 %)", or "1.2 GiB (no quota)"."""
    if quota <= 0:
        return f"{human(used)} (no quota)"
    return f"{human(used)} of {human(quota)} ({used * 100 // quota} %)"


def usage(r: redis.Redis, address: str) -> int:
    value: Any = r.hget(keys.info(address), "bytes")
    return int(value or 0)


async def usage_async(r: aioredis.Redis, address: str) -> int:
    value: Any = await r.hget(keys.info(address), "bytes")
    return int(value or 0)


class UsageCache:
    """What one receiver process last read of its mailboxes' usage, reused for `ttl` seconds.

    The answer at RCPT is only the early one: the delivery script checks the
    quota again in the same step as the write.  So a usage a second old costs
    nothing but where the refusal happens (at DATA instead of RCPT, or a few
    seconds of 452 after a purge), and a popular mailbox then costs no Redis
    round trip per message at RCPT, which measured about a fifth of the
    receiver's throughput (bench/limits_cost.py).
    """

    def __init__(self, ttl: float = 2.0) -> None:
        self.cache: TtlCache[int] = TtlCache(ttl)

    async def usage(self, r: aioredis.Redis, address: str, now: float) -> int:
        used = self.cache.get(address, now)
        if used is None:
            used = await usage_async(r, address)
            self.cache.put(address, used, now)
        return used

    def stored(self, address: str, size: int) -> None:
        """This process stored `size` more bytes for `address`: keep its cached usage close."""
        hit = self.cache.entries.get(address)
        if hit is not None:
            self.cache.replace(address, hit[1] + size)


def refused_at_rcpt(used: int, quota: int, declared: int | None) -> bool:
    """At RCPT: refuse a mailbox at or over its quota, or one the declared SIZE would take over."""
    return quota > 0 and (used >= quota or (declared is not None and used + declared > quota))


async def note_refused(r: aioredis.Redis, address: str, now: float | None = None) -> None:
    """Remember (best effort, for `fallback status`) that mail for `address` met its quota."""
    now = time.time() if now is None else now
    key = keys.quota_refused(address)
    async with r.pipeline(transaction=False) as pipe:
        pipe.zadd(key, {address: now})
        pipe.zremrangebyscore(key, "-inf", now - REFUSED_KEPT)
        await pipe.execute()


@dataclass(frozen=True)
class Refused:
    address: str
    used: int
    refused_at: float


def recently_refused(r: redis.Redis, limit: int = 20) -> list[Refused]:
    """Mailboxes the receiver refused mail for at their quota in the last day, latest first,
    each with what it holds now (after a purge it may be under the quota again)."""
    pipe = r.pipeline(transaction=False)
    for n in range(keys.QUOTA_SHARDS):
        pipe.zrangebyscore(keys.quota_refused_n(n), time.time() - REFUSED_KEPT, "+inf", withscores=True)
    found = sorted(((m.decode(), float(s)) for shard in pipe.execute() for m, s in shard),
                   key=lambda item: -item[1])[:limit]
    pipe = r.pipeline(transaction=False)
    for address, _ in found:
        pipe.hget(keys.info(address), "bytes")
    return [Refused(address, int(used or 0), when)
            for (address, when), used in zip(found, pipe.execute(), strict=True)]
