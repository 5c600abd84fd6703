"""What the service's health is made of: Redis memory and AOF, and how old the queues' oldest work is.

`fallback check` turns these readings into a Nagios verdict; /metrics can
export the same numbers.  Queue age is read from the stream entry ids (their
first part is the time of XADD, in milliseconds), so no clock of ours is
involved: the oldest entry a consumer group has not finished (pending, or not
yet delivered) is the oldest work.  A stream without a group counts all of
its entries; messages waiting in a queue's retry set count from the time in
their message id.  Works whatever the group is called, so the outbound and
the forward queue are read the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fallback import ids, keys
from fallback.redisconn import is_cluster

SCAN_LIMIT = 10_000  # entries read per stream shard; beyond that the queue is in trouble anyway


@dataclass(frozen=True)
class Backlog:
    """Work waiting in one queue (all its shards): in the stream, in the retry set, parked as dead."""

    name: str
    depth: int = 0
    oldest_ms: int | None = None  # when the oldest unfinished message was queued
    dead: int = 0
    refused: int = 0  # still queued and retried, but the next hop's last answer was a 5xx (forward)

    def age(self, now_ms: int) -> float:
        """Seconds the oldest message has waited; 0 for an empty queue."""
        return 0.0 if self.oldest_ms is None else max(0.0, (now_ms - self.oldest_ms) / 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sid(entry_id: Any) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _queued_ms(entry_id: Any, fields: Any) -> int:
    """The earlier of the entry's XADD time and its message id's time (a retry is re-added later)."""
    ms = _sid(entry_id)[0]
    msg_id = next((_text(v) for k, v in (fields or {}).items() if _text(k) == "id"), "")
    if ids.is_id(msg_id):
        ms = min(ms, ids.id_time_ms(msg_id))
    return ms


def _older(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def stream_backlog(r: redis.Redis, key: str) -> tuple[int, int | None]:
    """(unfinished entries, ms of the oldest) of one stream, over every consumer group.

    Unfinished: pending in a group (taken, not acknowledged) or not yet
    delivered to it; without a group, every entry.  Works whether finished
    entries are deleted (the outbound worker) or only acknowledged.
    """
    try:
        groups: Any = r.xinfo_groups(key)
    except redis.ResponseError:  # no such key: nothing queued
        return 0, None
    if not groups:
        entries: Any = r.xrange(key, count=SCAN_LIMIT)
        return len(entries), min((_queued_ms(e, f) for e, f in entries), default=None)
    views = []
    for g in groups:
        pending: Any = r.xpending_range(key, g["name"], min="-", max="+", count=SCAN_LIMIT)
        views.append((_sid(g["last-delivered-id"]), {_sid(p["message_id"]) for p in pending}))
    lowest = min([min(p) for _, p in views if p] + [last for last, _ in views])
    entries = r.xrange(key, min=f"{lowest[0]}-{lowest[1]}", count=SCAN_LIMIT)
    depth, oldest = 0, None
    for entry_id, fields in entries:
        sid = _sid(entry_id)
        if any(sid in pending or sid > last for last, pending in views):
            depth += 1
            oldest = _older(oldest, _queued_ms(entry_id, fields))
    return depth, oldest


def _zset_backlog(r: redis.Redis, key: str) -> tuple[int, int | None]:
    """A retry set: members start with the message id, whose first part is its time."""
    count, oldest = 0, None
    for member, _score in r.zscan_iter(key, count=1000):
        count += 1
        msg_id = _text(member).split("\t", 1)[0]
        if ids.is_id(msg_id):
            oldest = _older(oldest, ids.id_time_ms(msg_id))
    return count, oldest


def queue_backlog(r: redis.Redis, name: str, shard: Callable[[int], str], shards: int) -> Backlog:
    """One sharded queue; by convention `<stream>:retry` and `<stream>:dead` are its retry and parked sets,
    `<stream>:refused` the messages whose last attempt got a 5xx (kept, retried)."""
    depth, oldest, dead, refused = 0, None, 0, 0
    for n in range(shards):
        stream = shard(n)
        d, o = stream_backlog(r, stream)
        rd, ro = _zset_backlog(r, f"{stream}:retry")
        depth += d + rd
        oldest = _older(oldest, _older(o, ro))
        dead += int(r.zcard(f"{stream}:dead"))
        refused += int(r.zcard(f"{stream}:refused"))
    return Backlog(name, depth, oldest, dead, refused)


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


def primary_infos(r: redis.Redis, section: str) -> list[dict[str, Any]]:
    """INFO `section` of every primary: one on a single Redis, each node's on a cluster."""
    if not is_cluster(r):
        return [dict(r.info(section))]
    reply: Any = r.info(section, target_nodes="primaries")
    if reply and all(isinstance(v, dict) for v in reply.values()):
        return [dict(v) for v in reply.values()]
    return [dict(reply)]  # a cluster of one primary answers like a single server


def _node_memory(info: dict[str, Any]) -> Memory:
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    if limit:
        return Memory(used, limit, "maxmemory")
    return Memory(used, int(info.get("total_system_memory", 0)), "system")


def memory(r: redis.Redis) -> Memory:
    """Memory of the fullest primary: on a cluster, the first node to fill up refuses writes."""
    nodes = [_node_memory(i) for i in primary_infos(r, "memory")]
    return max(nodes, key=lambda m: m.used / m.limit if m.limit else 0.0)


@dataclass(frozen=True)
class Aof:
    enabled: bool
    last_write_ok: bool
    last_rewrite_ok: bool


def aof(r: redis.Redis) -> Aof:
    """AOF state of every primary taken together: one node without it is no durability there."""
    infos = primary_infos(r, "persistence")
    return Aof(enabled=all(int(i.get("aof_enabled", 0)) for i in infos),
               last_write_ok=all(i.get("aof_last_write_status", "ok") == "ok" for i in infos),
               last_rewrite_ok=all(i.get("aof_last_bgrewrite_status", "ok") == "ok" for i in infos))


def redis_now_ms(r: redis.Redis) -> int:
    """Redis's own clock: stream ids come from it, so ages are measured against it too."""
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def redis_health(r: redis.Redis) -> dict[str, Any]:
    """Ping time, memory and persistence, as `fallback status` and the admin API show them."""
    started = time.monotonic()
    r.ping()
    latency = (time.monotonic() - started) * 1000
    mems = primary_infos(r, "memory")
    a = aof(r)
    limits = [int(m.get("maxmemory", 0)) for m in mems]
    health: dict[str, Any] = {
        "ping_ms": round(latency, 2),
        "primaries": len(mems),
        # Summed over a cluster's primaries (0: a node without a limit).
        "used_memory": sum(int(m.get("used_memory", 0)) for m in mems),
        "maxmemory": sum(limits) if all(limits) else 0,
        "maxmemory_policy": mems[0].get("maxmemory_policy", "unknown"),
        "aof_enabled": a.enabled,
        "aof_last_write_status": "ok" if a.last_write_ok else "err",
    }
    try:
        health["appendfsync"] = r.config_get("appendfsync").get("appendfsync", "unknown")
    except Exception:  # CONFIG may be renamed or forbidden on a managed Redis
        health["appendfsync"] = "unknown"
    return health
