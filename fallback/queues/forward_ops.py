"""The operator's side of the forward queue: every record listed, and one retried, held or deleted.

A forward record (fallback.queues.forward) is one message for one
recipient; it is in exactly one place at a time: its shard's stream
(waiting, or in flight when a worker's group holds the entry), the retry
zset (due later), the dead-letter zset (the next hop kept refusing it) or
the held zset (an operator held it).  `scan` reads those places, shard by
shard, and the records' small fields (never the bytes).

Each change is one single-slot script (record, zsets and stream share the
shard's hash tag), under the record's lease, which the workers take too, so
an operator never changes a record a worker is sending right now.  A held
record is marked `parked` like a dead letter: the worker skips it (a stale
stream entry is dropped, see Forwarder._attempt) until `retry` puts it back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from fallback import ids, keys
from fallback.errors import InputError, NotFound
from fallback.queues.reliable import in_flight

_FIELDS = ("sender", "created", "attempts", "reply", "dead", "held", "last")

# KEYS: retry, dead, held, refused zsets, record, stream; ARGV: member, recipient, id, now.
# 1: back on the stream; 0: the record is gone.
_RETRY = """
if redis.call('EXISTS', KEYS[5]) == 0 then return 0 end
for i = 1, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call('HDEL', KEYS[5], 'dead', 'parked', 'refused_since', 'held', 'held_by', 'next')
redis.call('HSET', KEYS[5], 'runs', 0)
redis.call('XADD', KEYS[6], '*', 'a', ARGV[2], 'id', ARGV[3])
return 1
"""
# KEYS: retry, dead, held, refused zsets, record; ARGV: member, now, actor.  1: held; 0: gone.
_HOLD = """
if redis.call('EXISTS', KEYS[5]) == 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[5], 'parked', ARGV[2], 'held', ARGV[2], 'held_by', ARGV[3])
return 1
"""
# KEYS: retry, dead, held, refused zsets, record; ARGV: member.  The stream entries go by id.
_DELETE = """
for i = 1, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return redis.call('DEL', KEYS[5])
"""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass
class ForwardItem:
    """One message for one recipient in the forward queue."""

    msg_id: str
    recipient: str
    where: str                  # waiting | in flight | retry | dead | held
    shard: int
    due: float = 0.0            # retry: when; dead/held: since when
    sender: str = ""
    created: float = 0.0
    attempts: int = 0
    reply: str = ""
    size: int = 0
    missing: bool = False       # a queue entry whose record is gone (it is dropped when next taken)
    entry_ids: list[str] = field(default_factory=list)

    @property
    def member(self) -> str:
        return f"{self.msg_id}\t{self.recipient}"


def _shard_items(r: redis.Redis, n: int) -> list[ForwardItem]:
    stream = keys.forward_stream_n(n)
    inflight = in_flight(r, stream, keys.FORWARD_GROUP)
    found: dict[tuple[str, str], ForwardItem] = {}
    entries: Any = r.xrange(stream)
    for entry_id, entry in entries:
        eid = _text(entry_id)
        f = {_text(k): _text(v) for k, v in entry.items()}
        key = (f.get("id", ""), f.get("a", ""))
        item = found.setdefault(key, ForwardItem(key[0], key[1], "waiting", n))
        item.entry_ids.append(eid)
        if eid in inflight:
            item.where = "in flight"
    # A zset names where the record really is; a stream entry beside it is stale.
    for where, zkey in (("retry", keys.forward_retry_n(n)), ("dead", keys.forward_dead_n(n)),
                        ("held", keys.forward_held_n(n))):
        members: Any = r.zrange(zkey, 0, -1, withscores=True)
        for m, score in members:
            msg_id, _, rcpt = _text(m).partition("\t")
            item = found.setdefault((msg_id, rcpt), ForwardItem(msg_id, rcpt, where, n))
            item.where, item.due = where, float(score)
    return list(found.values())


def _fill(r: redis.Redis, items: list[ForwardItem]) -> None:
    with r.pipeline(transaction=False) as pipe:
        for item in items:
            rec = keys.forward_record(item.recipient, item.msg_id)
            pipe.hmget(rec, list(_FIELDS))
            pipe.hstrlen(rec, "raw")
        replies = pipe.execute()
    for item, values, size in zip(items, replies[::2], replies[1::2], strict=True):
        f = dict(zip(_FIELDS, (_text(v) if v is not None else "" for v in values), strict=True))
        item.missing = not f["created"]
        item.sender, item.created = f["sender"], float(f["created"] or 0)
        item.attempts, item.size = int(f["attempts"] or 0), int(size or 0)
        item.reply = f["dead"] if item.where == "dead" and f["dead"] else f["reply"]


def scan(r: redis.Redis, only: str | None = None) -> list[ForwardItem]:
    """Every record of the forward queue (or of one message id), oldest first."""
    items = [i for n in range(keys.FORWARD_SHARDS) for i in _shard_items(r, n)
             if only is None or i.msg_id == only]
    _fill(r, items)
    items.sort(key=lambda i: (i.created, i.msg_id, i.recipient))
    return items


def find(r: redis.Redis, msg_id: str) -> list[ForwardItem]:
    """The records of one message (one per forwarded recipient); NotFound/InputError naming why."""
    msg_id = msg_id.strip()
    found = scan(r, only=msg_id) if msg_id else []
    if not found and not ids.is_id(msg_id):
        raise InputError(f"{msg_id!r} is not a message id (26 characters, as "
                         "`fallback queue list --forward` shows)")
    if not found:
        raise NotFound(f"message {msg_id} is not in the forward queue")
    return found


class Busy(InputError):
    """A worker is forwarding the record right now."""


def _leased(r: redis.Redis, item: ForwardItem, ttl: float) -> str:
    lease, token = keys.forward_lease(item.recipient, item.msg_id), f"operator:{uuid.uuid4().hex[:8]}"
    if not r.set(lease, token, nx=True, px=int(ttl * 1000)):
        raise Busy(f"message {item.msg_id} for {item.recipient} is being forwarded right now; "
                   "try again in a moment")
    return token


def _unlease(r: redis.Redis, item: ForwardItem, token: str) -> None:
    lease = keys.forward_lease(item.recipient, item.msg_id)
    if r.get(lease) == token.encode():
        r.delete(lease)


def _zsets(n: int) -> list[str]:
    return [keys.forward_retry_n(n), keys.forward_dead_n(n), keys.forward_held_n(n),
            keys.forward_refused_n(n)]


def retry(r: redis.Redis, item: ForwardItem, now: float) -> bool:
    """Due now: back on its stream (a retry, a dead letter or a held record); False if it is gone.
    A record that is already waiting on its stream is left as it is (True)."""
    if item.where in ("waiting", "in flight"):
        return True
    done = r.eval(_RETRY, 6, *_zsets(item.shard), keys.forward_record(item.recipient, item.msg_id),
                  keys.forward_stream_n(item.shard), item.member, item.recipient, item.msg_id,
                  repr(now))
    return int(done) == 1


def hold(r: redis.Redis, item: ForwardItem, actor: str, now: float, lease_ttl: float) -> bool:
    """Keep the record here, untried, until `retry`; False if it is gone."""
    token = _leased(r, item, lease_ttl)
    try:
        done = r.eval(_HOLD, 5, *_zsets(item.shard), keys.forward_record(item.recipient, item.msg_id),
                      item.member, repr(now), actor)
    finally:
        _unlease(r, item, token)
    return int(done) == 1


def delete(r: redis.Redis, item: ForwardItem, lease_ttl: float) -> bool:
    """Take the record off the queue, bytes and all; False if it was gone already."""
    token = _leased(r, item, lease_ttl)
    try:
        gone = r.eval(_DELETE, 5, *_zsets(item.shard), keys.forward_record(item.recipient, item.msg_id),
                      item.member)
        if item.entry_ids:
            stream = keys.forward_stream_n(item.shard)
            with r.pipeline(transaction=True) as pipe:
                pipe.xack(stream, keys.FORWARD_GROUP, *item.entry_ids)
                pipe.xdel(stream, *item.entry_ids)
                pipe.execute()
    finally:
        _unlease(r, item, token)
    return int(gone) == 1
