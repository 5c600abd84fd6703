"""The Redis side of reconcile's state machine: each message's reconcile fields and the pending list.

Each message hash carries its reconcile state next to the raw bytes
(names in fallback/mailbox/fields.py):

    rstate        pending -> appending -> done, or failed (the server said NO)
    rbox          the main-store mailbox (modified UTF-7) it was / is being appended to
    rfolder       the fallback folder (INBOX/Sent/Trash) as last synced
    rflags        the flags as last synced
    ruidvalidity  UIDVALIDITY and UID from APPENDUID (or COPYUID after a move)
    ruid
    rts           when it was synced (ms), rerror: the server's reason for the last failure

The per-mailbox `pending` set is the work list; an id leaves it only when the
state recorded equals the message's current folder and flags, checked
atomically in Redis (_RECORD_LUA), so a webmail change made while reconcile
worked is kept for the next run.  Reads and writes go a chunk at a time, one
script call each: per-message commands cost more client CPU than the APPENDs
they feed.

Every change of `rstate` also moves the mailstore's reconcile counters
(`<mailstore>\t<state>` in the mailbox's shard of keys.reconcile_counts_shard),
in the same script on one Redis node and as a second step on a Cluster
(another slot, like the stats counters): /metrics reads reconcile
progress per mailstore from them without a scan (fallback.ops.metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from fallback import keys
from fallback.mailbox import record
from fallback.mailbox.fields import (
    FLAGS,
    FOLDER,
    PENDING,
    RBOX,
    RFLAGS,
    RFOLDER,
    RSTATE,
    RUID,
    RUIDVALIDITY,
    SIZE,
    TS,
)
from fallback.redisconn import is_cluster

NEVER = "\0"  # a folder no message has: "do not take the id off the pending list"
_META = (FOLDER, FLAGS, TS, SIZE, RSTATE, RBOX, RFOLDER, RFLAGS, RUIDVALIDITY, RUID)
_SEP = "\x1f"  # between the fields of one entry of _RECORD_LUA

# The end of both state scripts: `moved` (state -> change in count) goes to the mailstore's
# counters, `pending` excepted (it is what is left: messages - the others, metrics.py).
# Counted here when the counts shard is among the KEYS; returned either way, for the caller.
_COUNT_MOVES = """
local out = {redis.call('HGET', KEYS[2], 'mailstore') or 'default'}
for state, n in pairs(moved) do
  if state ~= 'pending' and n ~= 0 then
    if here == 1 then redis.call('HINCRBY', KEYS[3], out[1] .. '\\t' .. state, n) end
    out[#out + 1] = state
    out[#out + 1] = n
  end
end
return out
"""
# KEYS: the pending set, the mailbox's info hash, [the counts shard], then one message hash
# per entry.  ARGV[1]: 1 when the counts shard is KEYS[3] (one node: counted here), 0 when it
# is elsewhere (Cluster: the deltas are returned and counted by the caller); then one string
# per entry, fields joined by \x1f (packing one argument per message, not a dozen, halves
# the client's CPU per message): id, synced folder, synced flags, then field/value pairs.
# Writes the state only while the message exists (never a stub hash), and takes the id
# off the pending list only when its folder and flags are still those just synced.  One
# call per chunk: the batch is atomic and costs one round trip.  Running it twice changes
# nothing more (the second run finds each state already written): safe to retry.
_RECORD_LUA = """
local here = tonumber(ARGV[1])
local first = 3 + here
local moved = {}
for k = first, #KEYS do
  local e = {}
  for part in string.gmatch(ARGV[k - first + 2] .. '\\31', '([^\\31]*)\\31') do e[#e + 1] = part end
  local id, folder, flags = e[1], e[2], e[3]
  if redis.call('EXISTS', KEYS[k]) == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    if #e > 3 then
      local before = redis.call('HGET', KEYS[k], 'rstate')
      if not before or before == '' then before = 'pending' end
      redis.call('HSET', KEYS[k], unpack(e, 4))
      local after = redis.call('HGET', KEYS[k], 'rstate')
      if not after or after == '' then after = 'pending' end
      if before ~= after then
        moved[before] = (moved[before] or 0) - 1
        moved[after] = (moved[after] or 0) + 1
      end
    end
    if folder ~= '\\0' and redis.call('HGET', KEYS[k], 'folder') == folder
       and (redis.call('HGET', KEYS[k], 'flags') or '') == flags then
      redis.call('SREM', KEYS[1], id)
    end
  end
end
""" + _COUNT_MOVES

# Reads for a whole chunk in one command each (KEYS: the message hashes).
_META_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HMGET', KEYS[i], unpack(ARGV)) end
return out
"""
_RAW_LUA = record.LUA + """
local out = {}
for i = 1, #KEYS do out[i] = raw_of(KEYS[i]) end
return out
"""
# Puts a message marked `appending` but never sent back to `pending`.  KEYS: the message,
# the mailbox's info hash, [the counts shard]; ARGV[1] as in _RECORD_LUA.
_UNMARK_LUA = """
local here = tonumber(ARGV[1])
local moved = {}
if redis.call('HGET', KEYS[1], 'rstate') == 'appending' then
  redis.call('HSET', KEYS[1], 'rstate', 'pending')
  moved = {appending = -1}
end
""" + _COUNT_MOVES


@dataclass
class Item:
    """One message's metadata as read at the start of its chunk."""

    id: str
    folder: str
    flags: str
    ts: int
    size: int
    rstate: str
    rbox: str
    rfolder: str
    rflags: str
    ruidvalidity: int | None
    ruid: int | None

    @classmethod
    def parse(cls, msg_id: str, values: Sequence[bytes | None]) -> Item | None:
        """From the values of _META, in its order."""
        if values[0] is None:
            return None  # deleted since it was listed
        v = [x.decode("utf-8", "replace") if x is not None else "" for x in values]
        return cls(msg_id, v[0], v[1], int(v[2] or 0), int(v[3] or 0), v[4] or PENDING, v[5], v[6],
                   v[7], int(v[8]) if v[8].isdigit() else None, int(v[9]) if v[9].isdigit() else None)

    @property
    def flag_list(self) -> list[str]:
        return self.flags.split()


class Record(NamedTuple):
    """A state to write: the id leaves the pending list if `folder`/`flags` still hold (NEVER: not)."""

    id: str
    folder: str
    flags: str
    fields: dict[str, Any]


class MessageStates:
    """Reconcile's reads and writes of the message hashes and pending sets, script per chunk."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.clustered = is_cluster(r)
        self._record = r.register_script(_RECORD_LUA)
        self._meta = r.register_script(_META_LUA)
        self._raw = r.register_script(_RAW_LUA)

    async def pending(self, address: str) -> list[str]:
        """The mailbox's work list, in id order."""
        return sorted(m.decode() if isinstance(m, bytes) else m
                      for m in await self.r.smembers(keys.pending(address)))

    async def left(self, address: str) -> int:
        return int(await self.r.scard(keys.pending(address)))

    async def items(self, address: str, ids: list[str]) -> list[Item | None]:
        """Each id's metadata; None where the message is gone."""
        rows = await self._meta(keys=[keys.message(address, i) for i in ids], args=list(_META))
        return [Item.parse(msg_id, values) for msg_id, values in zip(ids, rows, strict=True)]

    async def forget(self, address: str, msg_id: str) -> None:
        """Off the work list: the message was deleted."""
        await self.r.srem(keys.pending(address), msg_id)

    async def deleted_for_good(self, address: str, ids: list[str]) -> int:
        """How many of these (gone) messages the user deleted for good: they have a tombstone
        (fallback/mailbox/expunge.py) and are counted, never appended."""
        if not ids:
            return 0
        found = await self.r.hmget(keys.expunged(address), ids)
        return sum(1 for v in found if v is not None)

    async def raws(self, address: str, items: list[Item]) -> list[bytes | None]:
        # The exact bytes whichever way they are stored (zstd or not: mailbox/record.py).
        return [record.raw_of(v) for v in await self._raw(keys=[keys.message(address, i.id) for i in items])]

    def _counted_keys(self, address: str) -> tuple[list[str], str]:
        """The counters' keys and ARGV[1] of the state scripts: the counts shard is among the
        keys on one node; on a Cluster it is another slot, counted by `_count` afterwards."""
        if self.clustered:
            return [keys.info(address)], "0"
        return [keys.info(address), keys.reconcile_counts_shard(address)], "1"

    async def _count(self, address: str, replies: Iterable[Any]) -> None:
        """Cluster only: add the state changes the scripts returned to the mailstore's counters."""
        if not self.clustered:
            return
        moved: dict[str, int] = {}
        for reply in replies:
            mailstore = _text(reply[0])
            for state, n in zip(reply[1::2], reply[2::2], strict=True):
                field = f"{mailstore}\t{_text(state)}"
                moved[field] = moved.get(field, 0) + int(n)
        if moved:
            pipe = self.r.pipeline(transaction=False)
            for field, n in moved.items():
                pipe.hincrby(keys.reconcile_counts_shard(address), field, n)
            await pipe.execute()

    async def record(self, address: str, entries: Iterable[Record]) -> None:
        """Record states of many messages in one atomic script call (see _RECORD_LUA)."""
        counted, here = self._counted_keys(address)
        keys_: list[str] = [keys.pending(address), *counted]
        args: list[str] = [here]
        for msg_id, folder, flags, fields in entries:
            keys_.append(keys.message(address, msg_id))
            parts = [msg_id, folder, flags]
            for k, v in fields.items():
                parts += [k, str(v).replace(_SEP, " ")]   # server words could hold anything
            args.append(_SEP.join(parts))
        await self._count(address, [await self._record(keys=keys_, args=args)])

    async def unmark(self, address: str, items: Iterable[Item]) -> None:
        """Messages marked `appending` but never sent: back to `pending`."""
        counted, here = self._counted_keys(address)
        pipe = self.r.pipeline(transaction=False)
        for item in items:
            # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
            pipe.execute_command("EVAL", _UNMARK_LUA, 1 + len(counted), keys.message(address, item.id),
                                 *counted, here)
        await self._count(address, await pipe.execute())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def size_batches(items: Iterable[Item], limit: int) -> Iterable[list[Item]]:
    """Consecutive runs of `items` whose sizes add up to at most `limit` (at least one each)."""
    batch: list[Item] = []
    size = 0
    for item in items:
        if batch and size + item.size > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        yield batch
