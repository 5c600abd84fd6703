"""Deleting from the fallback what reconcile finished with (`fallback purge --reconciled`)."""

from __future__ import annotations

from typing import Any

import redis

from fallback import keys
from fallback.mailbox import changes, record, search
from fallback.mailbox.fields import FOLDERS


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value



# KEYS: message, pending, outbox, the folder zsets (fields.FOLDERS), unseen, info, change token.
# ARGV: id, cutoff (ms), a new change token (changes.py).  Unseen, info and the token are
# counted from the end: FOLDERS may grow.
# Deletes only a message that reconcile finished (done, nothing pending, no outbound delivery
# left) at or before the cutoff; returns its size, or -1 when it must stay.
_PURGE_LUA = record.LUA + """
if redis.call('HGET', KEYS[1], 'rstate') ~= 'done' then return -1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return -1 end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return -1 end
local when = tonumber(redis.call('HGET', KEYS[1], 'rts') or redis.call('HGET', KEYS[1], 'ts') or '0')
if when > tonumber(ARGV[2]) then return -1 end
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
del_message(KEYS[1])  -- the record and its bytes (record.py)
for i = 4, #KEYS - 3 do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call('SREM', KEYS[#KEYS - 2], ARGV[1])
redis.call('HINCRBY', KEYS[#KEYS - 1], 'messages', -1)
redis.call('HINCRBY', KEYS[#KEYS - 1], 'bytes', -size)
redis.call('SET', KEYS[#KEYS], ARGV[3])
return size
"""


def delete_reconciled(r: redis.Redis, address: str, msg_ids: list[str], cutoff_ms: int,
                      deleted: list[str] | None = None) -> tuple[int, int]:
    """Delete messages reconcile has finished with (see _PURGE_LUA); (count, bytes) deleted.
    `deleted`, when given, gets the ids deleted (for the mail log and the message trace).

    The per-mailbox keys change atomically per message; the sharded stats
    counters (another slot) follow in a second step.
    """
    mbx_keys = [keys.pending(address), keys.outbox(address),
                *(keys.folder(address, f) for f in FOLDERS), keys.unseen(address), keys.info(address),
                keys.changes(address)]
    pipe = r.pipeline(transaction=False)
    for msg_id in msg_ids:
        # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
        pipe.execute_command("EVAL", _PURGE_LUA, 1 + len(mbx_keys), keys.message(address, msg_id),
                             *mbx_keys, msg_id, cutoff_ms, changes.token())
    results = [int(x) for x in pipe.execute()]
    sizes = [x for x in results if x >= 0]
    if deleted is not None:
        deleted.extend(i for i, x in zip(msg_ids, results, strict=True) if x >= 0)
    if sizes:
        search.forget(r, address, len(sizes))  # their search entries no longer match: counted for compaction
        stored: Any = r.hget(keys.info(address), "mailstore")
        mailstore = _text(stored or b"default")
        pipe = r.pipeline(transaction=False)
        pipe.hincrby(keys.stats_shard(address), f"{mailstore}\tmessages", -len(sizes))
        pipe.hincrby(keys.stats_shard(address), f"{mailstore}\tbytes", -sum(sizes))
        # Only `done` messages are purged: reconcile's counters (fallback/reconcile/state.py) follow.
        pipe.hincrby(keys.reconcile_counts_shard(address), f"{mailstore}\tdone", -len(sizes))
        pipe.execute()
    return len(sizes), sum(sizes)
