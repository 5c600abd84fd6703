"""The write path: storing a message in one or more mailboxes, atomically and durably.

A message is one hash (`mbx:{addr}:m:<id>`, fields.py) holding the exact bytes
in `raw` plus small display metadata, indexed in one sorted set per folder.
Delivery to every recipient is one atomic step (a Lua script, or MULTI/EXEC):
it either all happened or none did, which is what lets the receiver answer
250.  Ways in: the receiver's batched script calls (`DeliveryBatcher`,
`deliver_async`), the receiver's mixed mailbox-and-forward write
(`delivery_calls` + `run_atomic`), the webmail's sync write (`deliver`) and a
caller's own MULTI (`queue_delivery`, the outbound queue's Sent copy).  On a
Redis Cluster each runs per hash slot (`slot_groups`), guarded by keys.dedupe.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from fallback import keys
from fallback.mailbox import fields as F
from fallback.mailbox.durability import ReplicaAcks
from fallback.mailbox.headers import summarize
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Delivery:
    """One message for one mailbox."""

    address: str
    mailstore: str
    folder: str = F.INBOX
    flags: tuple[str, ...] = ()
    kind: str = "received"


def queue_delivery(pipe: Any, d: Delivery, msg_id: str, raw: bytes, meta: dict[str, str],
                   now_ms: int, stats: bool = True) -> None:
    """Queue one mailbox's writes on a (sync or async) MULTI pipeline.

    `stats=False` on a Redis Cluster, where the stats shard is another slot:
    the caller then adds the counts afterwards (`count_stored`).
    """
    fields: dict[str, Any] = {
        F.VERSION: keys.SCHEMA_VERSION, F.RAW: raw, F.FOLDER: d.folder, F.FLAGS: " ".join(d.flags),
        F.TS: now_ms, F.SIZE: len(raw), F.KIND: d.kind, F.RSTATE: F.PENDING, **meta,
    }
    pipe.hset(keys.message(d.address, msg_id), mapping=fields)
    pipe.zadd(keys.folder(d.address, d.folder), {msg_id: now_ms})
    if F.SEEN not in d.flags:
        pipe.sadd(keys.unseen(d.address), msg_id)
    pipe.sadd(keys.pending(d.address), msg_id)
    pipe.hincrby(keys.info(d.address), "messages", 1)
    pipe.hincrby(keys.info(d.address), "bytes", len(raw))
    pipe.hset(keys.info(d.address), "mailstore", d.mailstore)
    if stats:
        _queue_stats(pipe, [d], len(raw))


def _queue_stats(pipe: Any, deliveries: list[Delivery], size: int) -> None:
    for d in deliveries:
        pipe.hincrby(keys.stats_shard(d.address), f"{d.mailstore}\tmessages", 1)
        pipe.hincrby(keys.stats_shard(d.address), f"{d.mailstore}\tbytes", size)


def count_stored(r: redis.Redis, deliveries: list[Delivery], size: int) -> None:
    """Cluster only: the status counters of messages just stored, as a separate best-effort
    write (they are for `fallback status`; a crash in between leaves them short, never the mail)."""
    try:
        with r.pipeline(transaction=False) as pipe:
            _queue_stats(pipe, deliveries, size)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("status counters not updated for %d stored message(s): %s", len(deliveries), exc)


async def count_stored_async(r: aioredis.Redis, deliveries: list[Delivery], size: int) -> None:
    try:
        async with r.pipeline(transaction=False) as pipe:
            _queue_stats(pipe, deliveries, size)
            await pipe.execute()
    except redis.RedisError as exc:
        log.warning("status counters not updated for %d stored message(s): %s", len(deliveries), exc)


def slot_groups(deliveries: list[Delivery]) -> list[list[Delivery]]:
    """`deliveries` grouped by the hash slot of their mailbox keys, in first-seen order."""
    groups: dict[int, list[Delivery]] = {}
    for d in deliveries:
        groups.setdefault(key_slot(keys.mbx(d.address).encode()), []).append(d)
    return list(groups.values())


# The receiver's write: the same keys and fields as queue_delivery, but one EVALSHA
# instead of a MULTI of ten commands per recipient, which is most of the
# receiver's CPU per message.  A script is atomic like MULTI/EXEC; when Redis
# refuses writes (maxmemory) it fails at its first write, so nothing is half
# done.  ARGV: the id, time, size, number of deliveries, the small common fields
# (NUL-joined), the raw bytes, the dedupe guard's TTL ('' for none) and whether
# the stats shard is among the keys ('1'); then 5 per delivery (folder, flags,
# kind, mailstore, seen).  KEYS: the guard first when there is one (see
# keys.dedupe: if it exists the message is already here and nothing is written),
# then per delivery message, folder, unseen, pending, info and, with stats, the
# stats shard.  Returns how many mailboxes it was stored in.
_DELIVER_LUA = """
local id, now, size, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local k0, stride = 0, 5
if ARGV[7] ~= '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  redis.call('SET', KEYS[1], id, 'PX', ARGV[7])
  k0 = 1
end
if ARGV[8] == '1' then stride = 6 end
local common, packed, pos = {}, ARGV[5], 1
while true do
  local stop = string.find(packed, '\\0', pos, true)
  if not stop then common[#common + 1] = string.sub(packed, pos); break end
  common[#common + 1] = string.sub(packed, pos, stop - 1)
  pos = stop + 1
end
local raw, base = ARGV[6], 8
for d = 0, n - 1 do
  local k, a = k0 + d * stride, base + d * 5
  local mailstore = ARGV[a + 4]
  redis.call('HSET', KEYS[k + 1], 'raw', raw, 'folder', ARGV[a + 1], 'flags', ARGV[a + 2],
             'kind', ARGV[a + 3], unpack(common))
  redis.call('ZADD', KEYS[k + 2], now, id)
  if ARGV[a + 5] == '0' then redis.call('SADD', KEYS[k + 3], id) end
  redis.call('SADD', KEYS[k + 4], id)
  redis.call('HINCRBY', KEYS[k + 5], 'messages', 1)
  redis.call('HINCRBY', KEYS[k + 5], 'bytes', size)
  redis.call('HSET', KEYS[k + 5], 'mailstore', mailstore)
  if stride == 6 then
    redis.call('HINCRBY', KEYS[k + 6], mailstore .. '\\tmessages', 1)
    redis.call('HINCRBY', KEYS[k + 6], mailstore .. '\\tbytes', size)
  end
end
return n
"""
_DELIVER_SHA = hashlib.sha1(_DELIVER_LUA.encode(), usedforsecurity=False).hexdigest()  # the script id


def _deliver_call(deliveries: list[Delivery], msg_id: str, raw: bytes, meta: dict[str, str],
                  now_ms: int, stats: bool = True,
                  digest: str | None = None) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of one scripted delivery (see _DELIVER_LUA)."""
    # The small fields travel as one NUL-joined argument (split again in the script):
    # packing forty short arguments was most of redis-py's cost per message.
    common = [F.VERSION, keys.SCHEMA_VERSION, F.TS, str(now_ms), F.SIZE, str(len(raw)), F.RSTATE, F.PENDING]
    for name, value in meta.items():
        common += [name, value.replace("\0", "")]
    packed = "\0".join(common)
    keys_: list[str] = []
    guard = ""
    if digest is not None:
        keys_.append(keys.dedupe(deliveries[0].address, digest))
        guard = str(keys.DEDUPE_TTL_MS)
    args: list[Any] = [msg_id, now_ms, len(raw), len(deliveries), packed, raw, guard,
                       "1" if stats else "0"]
    for d in deliveries:
        keys_ += [keys.message(d.address, msg_id), keys.folder(d.address, d.folder),
                  keys.unseen(d.address), keys.pending(d.address), keys.info(d.address)]
        if stats:
            keys_.append(keys.stats_shard(d.address))
        args += [d.folder, " ".join(d.flags), d.kind, d.mailstore, "1" if F.SEEN in d.flags else "0"]
    return keys_, args


async def _evalsha(r: aioredis.Redis, keys_: list[str], args: list[Any]) -> int:
    try:
        return int(await r.evalsha(_DELIVER_SHA, len(keys_), *keys_, *args))
    except redis.exceptions.NoScriptError:
        # First use on this server (or after a restart): load it, then run it.
        return int(await r.eval(_DELIVER_LUA, len(keys_), *keys_, *args))  # caches it there too


def _evalsha_sync(r: redis.Redis, keys_: list[str], args: list[Any]) -> int:
    try:
        return int(r.evalsha(_DELIVER_SHA, len(keys_), *keys_, *args))
    except redis.exceptions.NoScriptError:
        return int(r.eval(_DELIVER_LUA, len(keys_), *keys_, *args))


async def deliver_async(r: aioredis.Redis, deliveries: list[Delivery], msg_id: str, raw: bytes,
                        meta: dict[str, str] | None = None,
                        batcher: DeliveryBatcher | None = None, digest: str | None = None) -> None:
    """Write the message to every recipient; raises on any failure (the sender gets 451).

    On one Redis (or Sentinel) that is one atomic script call.  On a Redis
    Cluster it is one call per hash slot the recipients fall in, run at once;
    when there are several, each carries the `digest` guard (keys.dedupe) so
    the sender's retry after a partial failure is not stored twice.
    """
    meta = summarize(raw) if meta is None else meta
    now_ms = int(time.time() * 1000)
    # The batcher knows already (asking costs microseconds, on the receiver's hottest path).
    if not (batcher.clustered if batcher is not None else is_cluster(r)):
        keys_, args = _deliver_call(deliveries, msg_id, raw, meta, now_ms)
        await (batcher.run(keys_, args) if batcher is not None else _evalsha(r, keys_, args))
        return
    groups = slot_groups(deliveries)
    guard = digest if len(groups) > 1 else None

    async def one(group: list[Delivery]) -> None:
        keys_, args = _deliver_call(group, msg_id, raw, meta, now_ms, stats=False, digest=guard)
        if batcher is not None:
            if await batcher.run(keys_, args):
                batcher.count(group, len(raw))  # written with a later batch, not waited for
        elif await _evalsha(r, keys_, args):
            await count_stored_async(r, group, len(raw))

    results = await asyncio.gather(*(one(g) for g in groups), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def run_atomic(r: aioredis.Redis, calls: list[tuple[str, list[str], list[Any]]],
                     replicas: ReplicaAcks | None = None) -> list[Any]:
    """Run Lua calls (source, KEYS, ARGV) as the receiver's one write; raises on any failure.

    On one Redis (or Sentinel) they run inside one MULTI/EXEC, so all happen or
    none; on a Redis Cluster each call must stay in one slot and they run at
    once, each its own atomic step (callers guard them against repetition).
    Either way each connection that wrote ends with WAIT when `replicas` asks.
    """
    if not is_cluster(r):
        async with r.pipeline(transaction=False) as pipe:
            # MULTI/EXEC sent by hand, not redis-py's transaction, so that WAIT can
            # follow on the same connection.
            pipe.execute_command("MULTI")
            for source, keys_, args in calls:
                pipe.execute_command("EVAL", source, len(keys_), *keys_, *args)
            pipe.execute_command("EXEC")
            waits = replicas.queue_wait(pipe, []) if replicas is not None else 0
            replies = list(await pipe.execute(raise_on_error=False))
        executed = replies[len(calls) + 1]
        if isinstance(executed, BaseException):
            raise executed
        results = list(executed)
        errors = [x for x in replies[: len(calls) + 1] + results if isinstance(x, BaseException)]
        short = replicas.shortfall(replies[len(replies) - waits:]) if replicas is not None else None
        if errors or short is not None:
            raise errors[0] if errors else short  # type: ignore[misc]
        return results

    async def one(source: str, keys_: list[str], args: list[Any]) -> Any:
        async with r.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVAL", source, len(keys_), *keys_, *args)
            if replicas is not None:
                replicas.queue_wait(pipe, keys_[:1])
            replies = list(await pipe.execute(raise_on_error=False))
        if isinstance(replies[0], BaseException):
            raise replies[0]
        short = replicas.shortfall(replies[1:]) if replicas is not None else None
        if short is not None:
            raise short
        return replies[0]

    done = await asyncio.gather(*(one(*call) for call in calls), return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException):
            raise result
    return list(done)


def delivery_calls(r: Any, deliveries: list[Delivery], msg_id: str, raw: bytes, meta: dict[str, str],
                   now_ms: int, digest: str | None) -> list[tuple[str, list[str], list[Any]]]:
    """The scripted writes that store a message for `deliveries`: one, or one per slot on a cluster
    (guarded by `digest` when there are several, see keys.dedupe)."""
    if not deliveries:
        return []
    if not is_cluster(r):
        keys_, args = _deliver_call(deliveries, msg_id, raw, meta, now_ms)
        return [(_DELIVER_LUA, keys_, args)]
    groups = slot_groups(deliveries)
    out = []
    for group in groups:
        keys_, args = _deliver_call(group, msg_id, raw, meta, now_ms, stats=False, digest=digest)
        out.append((_DELIVER_LUA, keys_, args))
    return out


class DeliveryBatcher:
    """Group commit for the receiver: deliveries that arrive together share one round trip.

    Each delivery is still its own atomic script call; the calls waiting while
    the previous batch was in flight go out as one pipeline, and Redis fsyncs
    the AOF once before answering them all.  A delivery's caller resumes only
    when its own call has succeeded (or with its own error), so 250 still
    means "durably written".  This halves the receiver's CPU per message under
    concurrency, where redis-py's per-command machinery dominated.  With
    `replica_acks`, the batch ends with WAIT (see durability.py) and fails as
    a whole if too few replicas confirm it.
    """

    def __init__(self, r: aioredis.Redis, max_batch: int = 64,
                 replicas: ReplicaAcks | None = None) -> None:
        self.r = r
        self.clustered = is_cluster(r)
        self.max_batch = max_batch
        self.replicas = replicas
        self.waiting: collections.deque[tuple[list[str], list[Any], asyncio.Future[int]]] = (
            collections.deque())
        self.drainer: asyncio.Task[None] | None = None
        # Cluster only: status counters of stored messages, added to Redis after the next
        # batch (see count) so that no 250 waits for a second write.
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def count(self, deliveries: list[Delivery], size: int) -> None:
        for d in deliveries:
            self.counts[(keys.stats_shard(d.address), f"{d.mailstore}\tmessages")] += 1
            self.counts[(keys.stats_shard(d.address), f"{d.mailstore}\tbytes")] += size
        self._wake()

    async def run(self, keys_: list[str], args: list[Any]) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append((keys_, args, future))
        self._wake()
        return await future

    def _wake(self) -> None:
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        # Counters left over with no delivery waiting go out in a batch of no deliveries.
        while self.waiting or self.counts:
            batch = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch))]
            try:
                results = await self._execute(batch)
            except Exception as exc:  # the connection failed: every call of the batch failed
                results = [exc] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():  # its client went away meanwhile
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(int(result))

    async def _execute(self, batch: list[tuple[list[str], list[Any], asyncio.Future[int]]]) -> list[Any]:
        counts, self.counts = self.counts, collections.Counter()
        if not self.clustered:
            results = await self._send_direct(batch)
            n_waits = len(results) - len(batch)
        else:
            async with self.r.pipeline(transaction=False) as pipe:
                for keys_, args, _ in batch:
                    pipe.execute_command("EVALSHA", _DELIVER_SHA, len(keys_), *keys_, *args)
                n_waits = (self.replicas.queue_wait(pipe, [keys_[0] for keys_, _, _ in batch])
                           if self.replicas is not None else 0)
                for (key, name), amount in counts.items():  # earlier batches' counters ride along
                    pipe.hincrby(key, name, amount)
                results = list(await pipe.execute(raise_on_error=False))
        n = len(batch)
        results, waits, added = results[:n], results[n : n + n_waits], results[n + n_waits :]
        failed = [x for x in added if isinstance(x, BaseException)]
        if failed:
            log.warning("status counters not updated for %d field(s): %s", len(failed), failed[0])
        if self.replicas is not None:
            short = self.replicas.shortfall(waits)
            if short is not None:
                results = [x if isinstance(x, BaseException) else short for x in results]
        for i, result in enumerate(results):
            if isinstance(result, redis.exceptions.NoScriptError):
                # First use on this server (or after a restart or failover): EVAL sends the
                # source, which also caches it there for the next batch.
                try:
                    results[i] = await self._execute_one(batch[i])
                except Exception as exc:
                    results[i] = exc
        return results

    async def _send_direct(self, batch: list[tuple[list[str], list[Any], asyncio.Future[int]]]) -> list[Any]:
        """One server (or Sentinel's primary): the batch's commands written at once on one pooled
        connection and their replies read in order.  redis-py's Pipeline does the same with
        about twice the CPU per command, and this is the receiver's hottest path."""
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", _DELIVER_SHA, len(keys_), *keys_, *args) for keys_, args, _ in batch]
        if self.replicas is not None:
            commands.append(self.replicas.command())  # same connection: it covers these writes
        pool = self.r.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(b"".join(hiredis.pack_command(c) for c in commands))
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except redis.ResponseError as exc:  # that command's own error reply
                    results.append(exc)
        except BaseException:
            # A reply may be left unread: this connection must not be reused as it is.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return results

    async def _execute_one(self, item: tuple[list[str], list[Any], asyncio.Future[int]]) -> int:
        keys_, args, _ = item
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVAL", _DELIVER_LUA, len(keys_), *keys_, *args)
            if self.replicas is not None:
                self.replicas.queue_wait(pipe, [keys_[0]])
            results = list(await pipe.execute(raise_on_error=False))
        if isinstance(results[0], BaseException):
            raise results[0]
        if self.replicas is not None:
            short = self.replicas.shortfall(results[1:])
            if short is not None:
                raise short
        return int(results[0])


def deliver(r: redis.Redis, deliveries: list[Delivery], msg_id: str, raw: bytes,
            meta: dict[str, str] | None = None) -> None:
    """The same write from sync code (the webmail's local delivery and Sent copy).

    On a Redis Cluster: one guarded script call per slot, the message id as the
    guard, so a repeated call after a partial failure completes it.
    """
    meta = summarize(raw) if meta is None else meta
    now_ms = int(time.time() * 1000)
    if not is_cluster(r):
        with r.pipeline(transaction=True) as pipe:
            for d in deliveries:
                queue_delivery(pipe, d, msg_id, raw, meta, now_ms)
            pipe.execute()
        return
    groups = slot_groups(deliveries)
    for group in groups:
        keys_, args = _deliver_call(group, msg_id, raw, meta, now_ms, stats=False,
                                    digest=msg_id if len(groups) > 1 else None)
        if _evalsha_sync(r, keys_, args):
            count_stored(r, group, len(raw))


