"""Undo send: a webmail message that waits `undo_send_seconds` before anything leaves.

The waiting message is an ordinary outbound delivery record (outbound.submit
with `not_before`): its Sent copy is filed at once, its remote recipients are
due only at the not-before time, and its queue entry waits in the shard's
retry zset until then, so the wait survives a restart and every key is the
sender's (the zset is the shard's, as for any retry).  What the webmail would
have delivered here at once -- copies for failed-over mailboxes, forward-queue
entries for healthy ones -- waits in the same record (`later`, JSON) and is
done by the worker that takes the record when it is due (`release`), each
recipient once: its copy id is fixed in the record and each is marked done.

Undo and the worker's take are each one script on the sender's keys: the take
removes the record's `undo` field under the message's lease, `undo` deletes
the record and the Sent copy only while that field is there, there is no lease
and the time has not run out.  Whichever runs first wins; an undone message
never reaches the smarthost, a mailbox or the forward queue.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.mailbox import changes, delivery, record
from fallback.mailbox import fields as F
from fallback.mailbox.compression import unpack  # the Sent copy's bytes, maybe zstd (issue 17)
from fallback.maillog import MailLog
from fallback.queues import forward
from fallback.redisconn import is_cluster

UNDO = "undo"        # record field: not-before time (s) while Undo is possible; gone once taken
NOT_BEFORE = "notbefore"  # record field: when the message may leave (kept)
LATER = "later"      # record field: JSON of the local and forward deliveries still to make
LATER_DONE = "later:"  # record field prefix: that recipient's copy is made
RECEIVED = "self_received"  # record field: the Received line of the sender's own copy
CUT = "cut"          # record field: length of the Sent copy's Received line
FORM = "form"        # record field: the compose form (Bcc, as typed) to put back in Drafts
SAVED = "saved"      # record field: the draft id it came from
COUNTED = "counted"  # record field: recipients counted against the send limits

# KEYS: record, lease, Sent copy, Sent folder, unseen, pending, info, outbox, Trash folder (the
# copy may have been deleted meanwhile), change token; ARGV: now, id, a new change token
# (mailbox/changes.py).
_UNDO = record.LUA + """
if redis.call('EXISTS', KEYS[2]) == 1 then return {0} end
local due = redis.call('HGET', KEYS[1], 'undo')
if not due or tonumber(due) <= tonumber(ARGV[1]) then return {0} end
local raw = raw_of(KEYS[3]) or ''
local size = tonumber(redis.call('HGET', KEYS[3], 'size') or '0')
local rec = redis.call('HMGET', KEYS[1], 'form', 'saved', 'counted', 'cut', 'mailstore')
redis.call('DEL', KEYS[1])
del_message(KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('ZREM', KEYS[9], ARGV[2])
redis.call('SREM', KEYS[5], ARGV[2])
redis.call('SREM', KEYS[6], ARGV[2])
redis.call('SREM', KEYS[8], ARGV[2])
redis.call('SET', KEYS[10], ARGV[3])
if size > 0 then
  redis.call('HINCRBY', KEYS[7], 'messages', -1)
  redis.call('HINCRBY', KEYS[7], 'bytes', -size)
end
return {1, raw, rec[1] or '', rec[2] or '', rec[3] or '0', rec[4] or '0', rec[5] or 'default', size}
"""


@dataclass
class Undone:
    """A message taken back: its bytes (without our Received line) and the form it came from."""

    body: bytes
    form: dict[str, str]
    saved: str
    counted: int


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def later_fields(local: list[tuple[str, str, str]], forwards: list[tuple[str, str]], self_received: bytes,
                 cut: int, form: dict[str, str], saved: str, counted: int) -> dict[str, Any]:
    """The record fields of a waiting send (outbound.submit's `extra`).

    local: (address, mailstore, copy id); forwards: (address, copy id).
    """
    return {LATER: json.dumps({"local": local, "forward": forwards}), RECEIVED: self_received,
            CUT: cut, FORM: json.dumps(form), SAVED: saved, COUNTED: counted}


def remaining(r: redis.Redis, sender: str, msg_id: str, now: float | None = None) -> float:
    """Seconds left to undo this message; 0 when it cannot be undone (any more)."""
    due = r.hget(keys.outbound_record(sender, msg_id), UNDO)
    if due is None or r.exists(keys.outbound_lease(sender, msg_id)):
        return 0.0
    return max(0.0, float(_text(due)) - (time.time() if now is None else now))


def undo(r: redis.Redis, sender: str, msg_id: str, now: float | None = None) -> Undone | None:
    """Take a waiting message back; None when it is too late (taken by a worker, or due)."""
    now = time.time() if now is None else now
    got: Any = r.eval(_UNDO, 10, keys.outbound_record(sender, msg_id), keys.outbound_lease(sender, msg_id),
                      keys.message(sender, msg_id), keys.folder(sender, F.SENT), keys.unseen(sender),
                      keys.pending(sender), keys.info(sender), keys.outbox(sender),
                      keys.folder(sender, F.TRASH), keys.changes(sender), now, msg_id, changes.token())
    if int(got[0]) != 1:
        return None
    raw, form, saved, counted, cut, mailstore, size = (got[1], got[2], got[3], got[4], got[5], got[6],
                                                       int(got[7]))
    # Cleanups in other slots (the shard's zset, the stats shard): a crash in between leaves a
    # queue entry that finds no record (dropped) and a status count one too high, never mail.
    r.zrem(keys.outbound_retry_n(keys.outbound_shard(sender)), f"{msg_id}\t{sender}")
    if size:
        pipe = r.pipeline(transaction=not is_cluster(r))
        pipe.hincrby(keys.stats_shard(sender), f"{_text(mailstore)}\tmessages", -1)
        pipe.hincrby(keys.stats_shard(sender), f"{_text(mailstore)}\tbytes", -size)
        pipe.execute()
    try:
        values = json.loads(_text(form)) if form else {}
    except ValueError:
        values = {}
    return Undone(unpack(bytes(raw))[int(_text(cut) or 0):], {str(k): str(v) for k, v in values.items()},
                  _text(saved), int(_text(counted) or 0))


async def release(r: aioredis.Redis, sender: str, msg_id: str, record: dict[str, Any], raw: bytes,
                  mail: MailLog) -> None:
    """Make the local copies and forward entries a waiting send held back (the worker, when due).

    `record`: the delivery record's fields, names as text, values as read (bytes)."""
    later = record.get(LATER)
    if not later:
        return
    plan = json.loads(later)
    key = keys.outbound_record(sender, msg_id)
    cut = int(record.get(CUT) or 0)
    body = raw[cut:]
    own = bytes(record.get(RECEIVED) or b"")

    def copy(addr: str, copy_id: str) -> bytes:
        return own + body if addr == sender else raw

    delivered: list[str] = []
    for addr, mailstore, copy_id in plan.get("local", []):
        if LATER_DONE + addr not in record:
            box = delivery.Delivery(addr, mailstore)
            await delivery.deliver_async(r, [box], copy_id, copy(addr, copy_id))
            await r.hset(key, LATER_DONE + addr, "1")
            mail.received(copy_id, sender, addr, via="webmail")
        delivered.append(addr)
    for addr, copy_id in plan.get("forward", []):
        if LATER_DONE + addr not in record:
            async with r.pipeline(transaction=True) as pipe:
                forward.queue_forward(pipe, addr, copy_id, copy(addr, copy_id), sender, time.time())
                await pipe.execute()
            await r.hset(key, LATER_DONE + addr, "1")
            mail.queued(copy_id, sender, addr, route="forward", via="webmail")
    if delivered:
        await r.hset(keys.message(sender, msg_id), F.LOCAL, " ".join(delivered))
    await r.hdel(key, LATER)
