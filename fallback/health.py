"""What the service's health is made of: Redis memory and AOF, and how old the queues' oldest work is.

`fallback check` turns these readings into a Nagios verdict; /metrics can
export the same numbers.  Queue age is read from the stream entry ids (their
first part is the time of XADD, in milliseconds), so no clock of ours is
involved: the oldest entry a consumer group has not finished (pending, or not
yet delivered) is the oldest work.  A stream without a group counts all of
its entries.  Works whatever the group is called, so the outbound and the
forward queue are read the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys


@dataclass(frozen=True)
class Backlog:
    """Work waiting in one queue (all its shards)."""

    name: str
    depth: int = 0
    oldest_ms: int | None = None  # XADD time of the oldest unfinished entry

    def age(self, now_ms: int) -> float:
        """Seconds the oldest entry has waited; 0 for an empty queue."""
        return 0.0 if self.oldest_ms is None else max(0.0, (now_ms - self.oldest_ms) / 1000)


def _ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


def _first_after(r: redis.Redis, key: str, after: str) -> Any:
    entries = r.xrange(key, min=f"({after}", count=1)
    return entries[0][0] if entries else None


def stream_backlog(r: redis.Redis, key: str) -> tuple[int, int | None]:
    """(unfinished entries, ms of the oldest) of one stream, over every consumer group."""
    try:
        groups = r.xinfo_groups(key)
    except redis.ResponseError:  # no such key: nothing queued
        return 0, None
    if not groups:
        length = int(r.xlen(key))
        first = r.xrange(key, count=1)
        return length, (_ms(first[0][0]) if first else None)
    depth, oldest = 0, None
    for g in groups:
        name = g["name"]
        last = g["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else str(last)
        pending = r.xpending(key, name)
        candidates = [pending["min"]] if pending.get("pending") else []
        undelivered = _first_after(r, key, last)
        if undelivered is not None:
            candidates.append(undelivered)
        lag = g.get("lag")
        if lag is None:  # Redis cannot tell after deletions; count what is left after last-delivered
            lag = len(r.xrange(key, min=f"({last}", count=100_000) or [])
        depth = max(depth, int(pending.get("pending") or 0) + int(lag))
        for c in candidates:
            oldest = _ms(c) if oldest is None else min(oldest, _ms(c))
    return depth, oldest


def queue_backlog(r: redis.Redis, name: str, shard: Callable[[int], str], shards: int) -> Backlog:
    depth, oldest = 0, None
    for n in range(shards):
        d, o = stream_backlog(r, shard(n))
        depth += d
        if o is not None:
            oldest = o if oldest is None else min(oldest, o)
    return Backlog(name, depth, oldest)


def backlogs(r: redis.Redis) -> list[Backlog]:
    """The outbound queue (webmail -> smarthost) and the forward queue (healthy users -> main system)."""
    return [queue_backlog(r, "outbound", keys.outbound_stream_n, keys.OUTBOUND_SHARDS),
            queue_backlog(r, "forward", keys.forward_stream_n, keys.FORWARD_SHARDS)]


@dataclass(frozen=True)
class Memory:
    used: int
    limit: int
    limit_source: str  # "maxmemory" or "system" (no maxmemory: the machine's RAM is the limit)

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.limit if self.limit else 0.0


def memory(r: redis.Redis) -> Memory:
    info = r.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    if limit:
        return Memory(used, limit, "maxmemory")
    return Memory(used, int(info.get("total_system_memory", 0)), "system")


@dataclass(frozen=True)
class Aof:
    enabled: bool
    last_write_ok: bool
    last_rewrite_ok: bool


def aof(r: redis.Redis) -> Aof:
    info = r.info("persistence")
    return Aof(enabled=bool(int(info.get("aof_enabled", 0))),
               last_write_ok=info.get("aof_last_write_status", "ok") == "ok",
               last_rewrite_ok=info.get("aof_last_bgrewrite_status", "ok") == "ok")


def redis_now_ms(r: redis.Redis) -> int:
    """Redis's own clock: stream ids come from it, so ages are measured against it too."""
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000
