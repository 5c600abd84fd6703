"""Deleting messages for good from Trash (the webmail's Empty Trash and "delete forever").

The message hash goes, bytes and all (memory freed, the quota's `bytes`
lowered); a tombstone stays in `mbx:{addr}:expunged` (keys.expunged) and the
id is put on the reconcile work list, so the next reconcile finds it gone,
counts it as "deleted for good by the user" and appends nothing.  A message
reconcile already put into the main store stays there (this deletes only
the fallback's copy).  A sent message whose delivery is still under way
(in the outbox) is kept: the outbound worker still reads its bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.mailbox import changes, record, search
from fallback.mailbox.fields import TRASH

BATCH = 500            # messages per pipeline when emptying a whole Trash
DELETED, MISSING, NOT_IN_TRASH, SENDING = 1, 0, -1, -2

# KEYS: message, pending, outbox, Trash zset, unseen, info, tombstones, change token.  ARGV: id,
# now (ms), a new change token (changes.py).
# Returns {outcome, size, rstate}: DELETED, MISSING, NOT_IN_TRASH or SENDING (see above).
_EXPUNGE_LUA = record.LUA + """
local v = redis.call('HMGET', KEYS[1], 'folder', 'size', 'rstate', 'ts')
if not v[4] then return {0, 0, ''} end
if v[1] ~= 'Trash' then return {-1, 0, ''} end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return {-2, 0, ''} end
local size = tonumber(v[2] or '0')
del_message(KEYS[1])  -- the record and its bytes (record.py)
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[6], 'messages', -1)
redis.call('HINCRBY', KEYS[6], 'bytes', -size)
redis.call('HSET', KEYS[7], ARGV[1], ARGV[2] .. ' ' .. (v[3] or 'pending'))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[8], ARGV[3])
return {1, size, v[3] or 'pending'}
"""


@dataclass
class Expunged:
    deleted: int = 0
    bytes: int = 0
    missing: int = 0
    not_in_trash: int = 0
    sending: int = 0

    def merge(self, other: Expunged) -> None:
        for name in ("deleted", "bytes", "missing", "not_in_trash", "sending"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def expunge(r: redis.Redis, address: str, ids: list[str], now_ms: int | None = None) -> Expunged:
    """Delete these messages of the mailbox's Trash for good, one atomic step each, one pipeline.

    The per-mailbox keys change atomically per message; the sharded stats
    counters (another slot) follow in a second step, as in purge.py.
    """
    out = Expunged()
    if not ids:
        return out
    now = str(now_ms if now_ms is not None else int(time.time() * 1000))
    mbx_keys = [keys.pending(address), keys.outbox(address), keys.folder(address, TRASH),
                keys.unseen(address), keys.info(address), keys.expunged(address), keys.changes(address)]
    pipe = r.pipeline(transaction=False)
    for msg_id in ids:
        # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
        pipe.execute_command("EVAL", _EXPUNGE_LUA, 1 + len(mbx_keys), keys.message(address, msg_id),
                             *mbx_keys, msg_id, now, changes.token())
    states: dict[str, int] = {}
    for code, size, rstate in pipe.execute():
        code = int(code)
        if code == DELETED:
            out.deleted += 1
            out.bytes += int(size)
            states[_text(rstate)] = states.get(_text(rstate), 0) + 1
        elif code == MISSING:
            out.missing += 1
        elif code == NOT_IN_TRASH:
            out.not_in_trash += 1
        else:
            out.sending += 1
    if out.deleted:
        search.forget(r, address, out.deleted)  # their search entries no longer match: counted for compaction
        stored: Any = r.hget(keys.info(address), "mailstore")
        mailstore = _text(stored or b"default")
        pipe = r.pipeline(transaction=False)
        pipe.hincrby(keys.stats_shard(address), f"{mailstore}\tmessages", -out.deleted)
        pipe.hincrby(keys.stats_shard(address), f"{mailstore}\tbytes", -out.bytes)
        # Reconcile's per-mailstore state counters (reconcile/state.py); pending is what is left.
        for rstate, n in states.items():
            if rstate and rstate != "pending":
                pipe.hincrby(keys.reconcile_counts_shard(address), f"{mailstore}\t{rstate}", -n)
        pipe.execute()
    return out


def empty_trash(r: redis.Redis, address: str, batch: int = BATCH) -> Expunged:
    """Every message in Trash, deleted for good, `batch` at a time.

    Bounded: as many rounds as Trash had batches when it started, plus one for
    what arrived in it meanwhile; what is still there after that (kept while
    being sent, or moved in during the last round) simply stays in Trash.
    """
    total = Expunged()
    trash = keys.folder(address, TRASH)
    rounds = int(r.zcard(trash)) // batch + 2
    skip = 0
    for _ in range(rounds):
        found: Any = r.zrange(trash, skip, skip + batch - 1)
        if not found:
            break
        done = expunge(r, address, [_text(i) for i in found])
        total.merge(done)
        skip += done.sending   # kept where they are: look past them next round
    return total


def tombstones(r: redis.Redis, address: str) -> int:
    """How many messages of this mailbox were deleted for good."""
    return int(r.hlen(keys.expunged(address)))
