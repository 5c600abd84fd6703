"""What the service's health is made of: Redis memory, AOF and durability policy, and how old the
queues' oldest work is.

The durability policy (`policies`, `policy_problems`) is judged on every
primary: `maxmemory-policy` other than noeviction can evict accepted mail
(critical); `appendfsync everysec` loses up to a second of it on power loss
(warning, or fine when replica_acks makes a replica hold it), `no` more
(critical, warning with replica_acks); maxmemory 0 leaves a percentage
memory reserve nothing to be a share of (warning).  appendfsync is read with
CONFIG GET; a managed Redis that renames or forbids CONFIG reads as
"unknown" (a note, not an error: INFO persistence still says whether the
AOF is on).

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
from fallback.config.limits import memory_reserve_bytes
from fallback.ops import watch
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
    held: int = 0  # kept here by an operator (`fallback queue hold --forward`) until a retry

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
    `<stream>:refused` the messages whose last attempt got a 5xx (kept, retried), `<stream>:held` the
    ones an operator holds (counted apart: holding them was a decision, not a backlog, and a held
    record may still have its entry in the stream until a worker passes it)."""
    depth, oldest, dead, refused, held = 0, None, 0, 0, 0
    for n in range(shards):
        stream = shard(n)
        d, o = stream_backlog(r, stream)
        rd, ro = _zset_backlog(r, f"{stream}:retry")
        depth += d + rd
        oldest = _older(oldest, _older(o, ro))
        dead += int(r.zcard(f"{stream}:dead"))
        refused += int(r.zcard(f"{stream}:refused"))
        held += int(r.zcard(f"{stream}:held"))
    return Backlog(name, depth, oldest, dead, refused, held)


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


@dataclass(frozen=True)
class Policy:
    """How one primary keeps accepted mail."""

    node: str
    maxmemory: int
    maxmemory_policy: str
    aof_enabled: bool
    appendfsync: str  # always | everysec | no | unknown (CONFIG refused)


def _appendfsync(r: redis.Redis, **target: Any) -> str:
    try:
        reply: Any = r.config_get("appendfsync", **target)
    except redis.ResponseError:  # CONFIG renamed, disabled or not allowed (NOPERM)
        return "unknown"
    if isinstance(reply, dict) and reply and all(isinstance(v, dict) for v in reply.values()):
        reply = next(iter(reply.values()))  # a cluster answers per node
    value = reply.get("appendfsync") if isinstance(reply, dict) else None
    return _text(value) if value else "unknown"


def _policy(node: str, mem: dict[str, Any], persistence: dict[str, Any], appendfsync: str) -> Policy:
    return Policy(node, int(mem.get("maxmemory", 0)), str(mem.get("maxmemory_policy", "unknown")),
                  bool(int(persistence.get("aof_enabled", 0))), appendfsync)


def policies(r: redis.Redis) -> list[Policy]:
    """The durability settings of every primary (one on a single Redis or behind Sentinel)."""
    if not is_cluster(r):
        kwargs = r.connection_pool.connection_kwargs
        node = f"{kwargs.get('host', kwargs.get('path', 'redis'))}:{kwargs.get('port', '')}".rstrip(":")
        return [_policy(node, dict(r.info("memory")), dict(r.info("persistence")), _appendfsync(r))]
    out = []
    for n in r.get_primaries():  # type: ignore[attr-defined]
        mem: Any = r.info("memory", target_nodes=n)
        pers: Any = r.info("persistence", target_nodes=n)
        out.append(_policy(n.name, dict(mem), dict(pers), _appendfsync(r, target_nodes=n)))
    return out


@dataclass(frozen=True)
class Problem:
    severity: str  # "critical", "warning", or "note" (worth saying, nothing to fix)
    text: str


def policy_problems(found: list[Policy], memory_reserve: str, replica_acks: int) -> list[Problem]:
    """What is wrong with how Redis keeps accepted mail; one line per problem, naming the
    primaries it applies to when not all of them."""
    seen: dict[tuple[str, str], list[str]] = {}

    def add(severity: str, text: str, node: str) -> None:
        seen.setdefault((severity, text), []).append(node)

    for p in found:
        if p.maxmemory_policy != "noeviction":
            add("critical", f"maxmemory-policy {p.maxmemory_policy}: eviction can delete accepted mail "
                "(set noeviction)", p.node)
        if p.maxmemory == 0 and memory_reserve_bytes(memory_reserve, 0) is None:
            add("warning", f"maxmemory 0 (no limit): the memory reserve ({memory_reserve}) needs a "
                "maxmemory, or give --memory-reserve a size", p.node)
        if not p.aof_enabled:
            continue  # the AOF check says so already
        if p.appendfsync == "everysec":
            if replica_acks > 0:
                add("note", f"appendfsync everysec (replica_acks {replica_acks})", p.node)
            else:
                add("warning", "appendfsync everysec: up to 1 s of accepted mail is lost on power "
                    "loss (set always, or replica_acks)", p.node)
        elif p.appendfsync == "no":
            add("warning" if replica_acks > 0 else "critical",
                "appendfsync no: accepted mail may wait seconds for the disk (set always)", p.node)
        elif p.appendfsync == "unknown":
            add("note", "appendfsync unknown (CONFIG refused)", p.node)
    out = []
    for (severity, text), nodes in seen.items():
        where = "" if len(nodes) == len(found) else f" on {', '.join(nodes)}"
        out.append(Problem(severity, f"Redis{where} {text}"))
    return out


def memory_reserve(r: redis.Redis, reserve: str) -> tuple[Memory, int | None]:
    """The fullest primary and the used_memory at which the receiver refuses new mail there
    (fallback.config.limits.memory_reserve_bytes of its maxmemory; None: no reserve)."""
    mem = memory(r)
    return mem, memory_reserve_bytes(reserve, mem.limit if mem.limit_source == "maxmemory" else 0)


def redis_now_ms(r: redis.Redis) -> int:
    """Redis's own clock: stream ids come from it, so ages are measured against it too."""
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def redis_health(r: redis.Redis, memory_reserve: str = "90%", replica_acks: int = 0) -> dict[str, Any]:
    """Ping time, memory, persistence and what is wrong with the durability policy, as
    `fallback status` and the admin API show them."""
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
    found = policies(r)
    health["appendfsync"] = ",".join(sorted({p.appendfsync for p in found}))  # "always" when all agree
    health["problems"] = [{"severity": p.severity, "text": p.text}
                          for p in policy_problems(found, memory_reserve, replica_acks)]
    return health


def mailstore_problems(r: redis.Redis) -> list[Problem]:
    """Issue 18: what `fallback watch` last published, as `fallback check` reports it: a mailstore
    past fail-after or one the watcher cannot probe is critical; a failed-over one that looks
    healthy again is a warning (an operator decides to reconcile and end the failover)."""
    out = []
    for rec in watch.records(r):
        if rec.config_problem:
            out.append(Problem("critical", rec.config_problem))
        elif rec.failing:
            state = "failed over" if rec.failed_over else "not failed over"
            out.append(Problem("critical", f"mailstore {rec.mailstore} failing: {rec.failures} probes "
                               f"in a row ({rec.kind}: {rec.reason}; {state})"))
        elif rec.healthy_again:
            out.append(Problem("warning", f"mailstore {rec.mailstore} looks healthy again"))
    return out
