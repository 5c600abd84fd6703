"""The delivery script: the receiver's atomic write of one message to its mailboxes.

Owns the Lua source, the layout of one call (KEYS and ARGV), the quota check
it makes in the same step as the write, and packing a call for the wire
without copying the message (`pack_call`).  The ways in that use it are in
delivery.py and batcher.py.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import hiredis
import redis

from fallback import keys
from fallback.errors import MailboxFull
from fallback.mailbox import changes, record
from fallback.mailbox import fields as F
from fallback.mailbox.record import Stored

if TYPE_CHECKING:
    from fallback.mailbox.delivery import Delivery

# The receiver's write: the same keys and fields as delivery.queue_delivery, but one
# EVALSHA instead of a MULTI of ten commands per recipient, which is most of the
# receiver's CPU per message.  A script is atomic like MULTI/EXEC; when Redis
# refuses writes (maxmemory) it fails at its first write, so nothing is half
# done.  ARGV: the id, time, size, number of deliveries, the small common fields
# (NUL-joined; the value of 'm', the packed display values, is last and taken whole), the
# dedupe guard's TTL ('' for none), whether the stats shard is among the keys ('1') and the
# new change token (changes.py); then 6 per delivery (folder, flags, kind, mailstore, seen,
# quota); the bytes to store last (so that pack_call can send them as they are), compressed
# by the caller (record.store), never here; `size` is the raw size.
# KEYS: the guard first when there is one (see keys.dedupe: if it exists the
# message is already here and nothing is written), then per delivery message,
# folder, unseen, pending, info, the message's bytes (keys.message_raw: record layout 3),
# the change token and, with stats, the stats shard.
# The quota (bytes, 0 = none) is checked for every delivery before anything is
# written: the info hash's `bytes` (what the mailbox holds) plus this message
# must not pass it.  Returns how many mailboxes it was stored in, 0 when the
# guard says it already was, or -k when the k-th delivery of the call is over
# its quota (then nothing was written).
DELIVER_LUA = record.LUA + """
local id, now, size, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local k0, stride, base = 0, 7, 8
if ARGV[6] ~= '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  k0 = 1
end
if ARGV[7] == '1' then stride = 8 end
for d = 0, n - 1 do
  local quota = tonumber(ARGV[base + d * 6 + 6])
  if quota > 0 then
    local used = tonumber(redis.call('HGET', KEYS[k0 + d * stride + 5], 'bytes') or '0')
    if used + size > quota then return -(d + 1) end
  end
end
if k0 == 1 then redis.call('SET', KEYS[1], id, 'PX', ARGV[6]) end
local common, packed, pos = {}, ARGV[5], 1
while true do
  local stop = string.find(packed, '\\0', pos, true)
  if not stop or (#common % 2 == 1 and common[#common] == 'm') then
    common[#common + 1] = string.sub(packed, pos); break
  end
  common[#common + 1] = string.sub(packed, pos, stop - 1)
  pos = stop + 1
end
local raw = ARGV[#ARGV]
for d = 0, n - 1 do
  local k, a = k0 + d * stride, base + d * 6
  local mailstore = ARGV[a + 4]
  -- Layout 3 (record.py): the bytes in a key of their own beside the record.
  redis.call('HSET', KEYS[k + 1], 'folder', ARGV[a + 1], unpack(common))
  set_raw(KEYS[k + 6], raw)
  -- Defaults are not stored (record.DEFAULTS): no flags, kind 'received'.
  if ARGV[a + 2] ~= '' then redis.call('HSET', KEYS[k + 1], 'flags', ARGV[a + 2]) end
  if ARGV[a + 3] ~= 'received' then redis.call('HSET', KEYS[k + 1], 'kind', ARGV[a + 3]) end
  redis.call('ZADD', KEYS[k + 2], now, id)
  if ARGV[a + 5] == '0' then redis.call('SADD', KEYS[k + 3], id) end
  redis.call('SADD', KEYS[k + 4], id)
  redis.call('HINCRBY', KEYS[k + 5], 'messages', 1)
  redis.call('HINCRBY', KEYS[k + 5], 'bytes', size)
  redis.call('HSET', KEYS[k + 5], 'mailstore', mailstore)
  redis.call('SET', KEYS[k + 7], ARGV[8])
  if stride == 8 then
    redis.call('HINCRBY', KEYS[k + 8], mailstore .. '\\tmessages', 1)
    redis.call('HINCRBY', KEYS[k + 8], mailstore .. '\\tbytes', size)
  end
end
return n
"""
DELIVER_SHA = hashlib.sha1(DELIVER_LUA.encode(), usedforsecurity=False).hexdigest()  # the script id


def deliver_call(deliveries: list[Delivery], msg_id: str, stored: Stored,
                 now_ms: int, stats: bool = True,
                 digest: str | None = None) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of one scripted delivery (see DELIVER_LUA) of a record.store'd message."""
    # The small fields travel as one NUL-joined argument (split again in the script):
    # packing forty short arguments was most of redis-py's cost per message.  Layout 2
    # (record.py): no rstate (absent is pending) and the display values in one field,
    # which holds NULs of its own, so it is the last of the common fields, passed whole.
    raw, size = stored.data, stored.size
    extra = [part for name, value in stored.extra for part in (name, value.replace("\0", ""))]
    packed = "\0".join([F.TS, str(now_ms), F.SIZE, str(size), *extra, F.PACKED]) + "\0" + stored.packed
    keys_: list[str] = []
    guard = ""
    if digest is not None:
        keys_.append(keys.dedupe(deliveries[0].address, digest))
        guard = str(keys.DEDUPE_TTL_MS)
    args: list[Any] = [msg_id, now_ms, size, len(deliveries), packed, guard, "1" if stats else "0",
                       changes.token()]
    for d in deliveries:
        keys_ += [keys.message(d.address, msg_id), keys.folder(d.address, d.folder),
                  keys.unseen(d.address), keys.pending(d.address), keys.info(d.address),
                  keys.message_raw(d.address, msg_id), keys.changes(d.address)]
        if stats:
            keys_.append(keys.stats_shard(d.address))
        args += [d.folder, " ".join(d.flags), d.kind, d.mailstore, "1" if F.SEEN in d.flags else "0",
                 d.quota]
    args.append(raw)
    return keys_, args


def check_result(result: Any, deliveries: list[Delivery], size: int) -> int:
    """The script's reply as a count of mailboxes written; MailboxFull when one was over quota."""
    n = int(result)
    if n < 0:
        d = deliveries[-n - 1]
        raise MailboxFull(f"{d.address} is at its quota of {d.quota} bytes (message of {size} bytes)",
                          address=d.address)
    return n


def address_of_info(key: str) -> str:
    """The mailbox of a keys.info key."""
    return key[len(keys.mbx("")) - 1 : -len("}:info")]


def _layout(keys_: list[str], args: list[Any]) -> tuple[int, int]:
    """(index of the first delivery's first key, keys per delivery) of one call."""
    return (1 if args[5] != "" else 0), (8 if args[6] == "1" else 7)


def refused_address(keys_: list[str], args: list[Any], result: Any) -> str:
    """The mailbox a call's reply -k (over quota) names."""
    k0, stride = _layout(keys_, args)
    return address_of_info(keys_[k0 + (-int(result) - 1) * stride + 4])


def quota_checks(keys_: list[str], args: list[Any]) -> list[tuple[str, int, int]]:
    """(info key, quota, message size) of each delivery of a call that has a quota: what the
    script will check, for a caller that must check it first (delivery._run_watched)."""
    n, size = int(args[3]), int(args[2])
    k0, stride = _layout(keys_, args)
    out = []
    for d in range(n):
        quota = int(args[8 + d * 6 + 5])
        if quota > 0:
            out.append((keys_[k0 + d * stride + 4], quota, size))
    return out


# A message bigger than this is sent to Redis in pieces of this size, each written
# and drained before the next: asyncio (3.11) copies whatever a write cannot send
# at once, twice, and a 40 MiB message would otherwise be held three or four times.
BIG = 256 * 1024
PIECE = 1024 * 1024


def pack_call(command: tuple[Any, ...]) -> list[bytes | memoryview]:
    """RESP for `command` as pieces to write in order.  A big last argument (the message) is
    a piece of its own, the caller's object itself, instead of being copied into the packing."""
    last = command[-1]
    if not isinstance(last, bytes) or len(last) < BIG:
        return [hiredis.pack_command(command)]
    head = hiredis.pack_command(command[:-1])
    # hiredis counted one argument fewer: replace its "*<n>\r\n" with the full count.
    head = b"*%d\r\n" % len(command) + head[head.index(b"\r\n") + 2 :]
    view = memoryview(last)
    return [head + b"$%d\r\n" % len(last),
            *(view[i : i + PIECE] for i in range(0, len(last), PIECE)), b"\r\n"]


async def read_replies(conn: Any, n: int) -> list[Any]:
    """The next n replies on a raw connection, a command's own error reply (a Lua error, a
    refused write) kept in its place rather than raised."""
    replies: list[Any] = []
    for _ in range(n):
        try:
            replies.append(await conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies
