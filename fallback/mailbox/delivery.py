"""The write path: storing a message in one or more mailboxes, atomically and durably.

A message is one hash (`mbx:{addr}:m:<id>`, fields.py) holding the exact bytes
in `raw` plus small display metadata, indexed in one sorted set per folder.
Delivery to every recipient is one atomic step (a Lua script, or MULTI/EXEC):
it either all happened or none did, which is what lets the receiver answer
250.  Ways in: the receiver's batched script calls (`deliver_async` through
batcher.DeliveryBatcher), the receiver's mixed mailbox-and-forward write
(`copy_calls` + `run_atomic`, one copy per original
recipient as in `deliver_copies_async`), the webmail's sync write (`deliver`) and a
caller's own MULTI (`queue_delivery`, the outbound queue's Sent copy).  On a
Redis Cluster each runs per hash slot (`slot_groups`), guarded by keys.dedupe.
The script itself, with the quota check it makes in the same step as the
write, is deliverscript.py.  Every way in keeps the mailbox's usage
(`bytes` in keys.info, what mailbox/quota.py reads); only the receiver's ways
in pass a quota (Delivery.quota), so the webmail's Sent copies and local
deliveries are counted but never refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from fallback import keys
from fallback.errors import MailboxFull, StorageError
from fallback.mailbox import changes, record
from fallback.mailbox import fields as F
from fallback.mailbox.compression import Codec
from fallback.mailbox.deliverscript import (
    DELIVER_LUA,
    DELIVER_SHA,
    address_of_info,
    check_result,
    deliver_call,
    pack_call,
    quota_checks,
    read_replies,
    refused_address,
)
from fallback.mailbox.durability import ReplicaAcks
from fallback.mailbox.headers import summarize
from fallback.redisconn import is_cluster

if TYPE_CHECKING:
    from fallback.mailbox.batcher import DeliveryBatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One message for one mailbox.  `quota`: the most bytes the mailbox may hold with it
    (0: no check), refused in the same step as the write (deliverscript.py)."""

    address: str
    mailstore: str
    folder: str = F.INBOX
    flags: tuple[str, ...] = ()
    kind: str = "received"
    quota: int = 0


def queue_delivery(pipe: Any, d: Delivery, msg_id: str, raw: bytes, meta: dict[str, str],
                   now_ms: int, stats: bool = True, how: Codec | None = None) -> None:
    """Queue one mailbox's writes on a (sync or async) MULTI pipeline.

    `stats=False` on a Redis Cluster, where the stats shard is another slot:
    the caller then adds the counts afterwards (`count_stored`).  `how`: the
    compression (record.store; default zstd).
    """
    fields: dict[str, Any] = {F.FOLDER: d.folder, F.TS: now_ms, **record.non_defaults(d.flags, d.kind)}
    record.queue_write(pipe, keys.message(d.address, msg_id), record.store(raw, meta, how), fields)
    _queue_indexes(pipe, d, msg_id, len(raw), now_ms, stats)


def _queue_indexes(pipe: Any, d: Delivery, msg_id: str, size: int, now_ms: int,
                   stats: bool = True) -> None:
    """The writes besides the record: folder index, unseen and pending sets, usage (the raw
    size, never the compressed one: quotas count what the user received), status counters."""
    pipe.zadd(keys.folder(d.address, d.folder), {msg_id: now_ms})
    if F.SEEN not in d.flags:
        pipe.sadd(keys.unseen(d.address), msg_id)
    pipe.sadd(keys.pending(d.address), msg_id)
    pipe.hincrby(keys.info(d.address), "messages", 1)
    pipe.hincrby(keys.info(d.address), "bytes", size)
    pipe.hset(keys.info(d.address), "mailstore", d.mailstore)
    if stats:
        _queue_stats(pipe, [d], size)
    changes.queue_touch(pipe, d.address)


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

async def _evalsha(r: aioredis.Redis, keys_: list[str], args: list[Any]) -> int:
    try:
        return int(await r.evalsha(DELIVER_SHA, len(keys_), *keys_, *args))
    except redis.exceptions.NoScriptError:
        # First use on this server (or after a restart): load it, then run it.
        return int(await r.eval(DELIVER_LUA, len(keys_), *keys_, *args))  # caches it there too


def _evalsha_sync(r: redis.Redis, keys_: list[str], args: list[Any]) -> int:
    try:
        return int(r.evalsha(DELIVER_SHA, len(keys_), *keys_, *args))
    except redis.exceptions.NoScriptError:
        return int(r.eval(DELIVER_LUA, len(keys_), *keys_, *args))


async def deliver_async(r: aioredis.Redis, deliveries: list[Delivery], msg_id: str, raw: bytes,
                        meta: dict[str, str] | None = None,
                        batcher: DeliveryBatcher | None = None, digest: str | None = None,
                        how: Codec | None = None) -> None:
    """Write the message to every recipient; raises on any failure (the sender gets 451), and
    MailboxFull (nothing written) when a delivery's quota would be passed.

    On one Redis (or Sentinel) that is one atomic script call.  On a Redis
    Cluster it is one call per hash slot the recipients fall in, run at once;
    when there are several, each carries the `digest` guard (keys.dedupe) so
    the sender's retry after a partial failure is not stored twice.
    """
    stored = record.store(raw, summarize(raw) if meta is None else meta, how)
    now_ms = int(time.time() * 1000)
    # The batcher knows already (asking costs microseconds, on the receiver's hottest path).
    if not (batcher.clustered if batcher is not None else is_cluster(r)):
        keys_, args = deliver_call(deliveries, msg_id, stored, now_ms)
        done = await (batcher.run(keys_, args) if batcher is not None else _evalsha(r, keys_, args))
        check_result(done, deliveries, len(raw))
        return
    groups = slot_groups(deliveries)
    guard = digest if len(groups) > 1 else None
    if len(groups) > 1:
        await _precheck_cluster(r, [(keys.info(d.address), d.quota, len(raw))
                                    for d in deliveries if d.quota > 0])

    async def one(group: list[Delivery]) -> None:
        keys_, args = deliver_call(group, msg_id, stored, now_ms, stats=False, digest=guard)
        if batcher is not None:
            if check_result(await batcher.run(keys_, args), group, len(raw)):
                batcher.count(group, len(raw))  # written with a later batch, not waited for
        elif check_result(await _evalsha(r, keys_, args), group, len(raw)):
            await count_stored_async(r, group, len(raw))

    results = await asyncio.gather(*(one(g) for g in groups), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def deliver_copies_async(r: aioredis.Redis, copies: list[tuple[list[Delivery], bytes]],
                               msg_id: str, replicas: ReplicaAcks | None = None,
                               digest: str | None = None, how: Codec | None = None) -> None:
    """One message whose mailboxes get different bytes (each copy its own Delivered-To:, the
    original recipient it was reached through) as the receiver's one write: on one Redis one
    MULTI/EXEC of a script call per copy (run_atomic, quotas WATCHed); on a Redis Cluster one
    call per copy and slot, each guarded by `digest` so the sender's retry stores nothing twice."""
    clustered = is_cluster(r)
    calls, parts = copy_calls(copies, msg_id, int(time.time() * 1000), clustered,
                              digest if clustered else None, how)
    await count_copies_async(r, parts, await run_atomic(r, calls, replicas), clustered)


def copy_calls(copies: list[tuple[list[Delivery], bytes]], msg_id: str, now_ms: int, clustered: bool,
               digest: str | None, how: Codec | None = None,
               ) -> tuple[list[tuple[str, list[str], list[Any]]], list[tuple[list[Delivery], int]]]:
    """The scripted writes of `copies` (copies without mailboxes skipped): one per copy, on a
    cluster one per copy and slot (guarded by `digest` when given), with the (mailboxes, size)
    each writes, in the same order (for count_copies_async)."""
    calls: list[tuple[str, list[str], list[Any]]] = []
    parts: list[tuple[list[Delivery], int]] = []
    for group, raw in copies:
        if not group:
            continue
        stored = record.store(raw, summarize(raw), how)  # compressed once per copy
        for part in slot_groups(group) if clustered else [group]:
            keys_, args = deliver_call(part, msg_id, stored, now_ms, stats=not clustered,
                                       digest=digest)
            calls.append((DELIVER_LUA, keys_, args))
            parts.append((part, len(raw)))
    return calls, parts


async def count_copies_async(r: aioredis.Redis, parts: list[tuple[list[Delivery], int]],
                             results: list[Any], clustered: bool) -> None:
    """After copy_calls' writes (their results first in `results`): raise MailboxFull for a
    refused one; on a cluster add the status counters of the parts really stored (0: a retry)."""
    for (part, size), result in zip(parts, results, strict=False):
        if check_result(result, part, size) and clustered:
            await count_stored_async(r, part, size)


async def run_atomic(r: aioredis.Redis, calls: list[tuple[str, list[str], list[Any]]],
                     replicas: ReplicaAcks | None = None) -> list[Any]:
    """Run Lua calls (source, KEYS, ARGV) as the receiver's one write; raises on any failure.

    On one Redis (or Sentinel) they run inside one MULTI/EXEC, so all happen or
    none; on a Redis Cluster each call must stay in one slot and they run at
    once, each its own atomic step (callers guard them against repetition).
    Either way each connection that wrote ends with WAIT when `replicas` asks.
    A delivery call with a quota is checked in the same step: on one Redis by
    WATCHing the mailboxes' usage (_run_watched), so that the forward records
    of a message refused for quota are not written either; on a cluster by the
    script itself (the other slots' parts are guarded, the retry completes them).
    """
    checks = [c for source, keys_, args in calls if source is DELIVER_LUA
              for c in quota_checks(keys_, args)]
    if not is_cluster(r) and checks:
        return await _run_watched(r, calls, checks, replicas)
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

    if checks and len(calls) > 1:
        await _precheck_cluster(r, checks)

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
    out: list[Any] = list(done)
    for (source, keys_, call_args), result in zip(calls, out, strict=True):
        if source is DELIVER_LUA and int(result) < 0:
            address = refused_address(keys_, call_args, result)
            raise MailboxFull(f"{address} is at its quota", address=address)
    return out


async def _precheck_cluster(r: aioredis.Redis, checks: list[tuple[str, int, int]]) -> None:
    """Before the per-slot writes of one message on a Redis Cluster: refuse it as a whole
    (MailboxFull, nothing written) when a recipient is already too full for it.  Each
    slot's script checks again atomically; this read only keeps the usual case (one
    full recipient among several) from storing the message for the others and then
    again on the sender's retry."""
    if not checks:
        return
    async with r.pipeline(transaction=False) as pipe:
        for key, _, _ in checks:
            pipe.hget(key, "bytes")
        used = [int(v or 0) for v in await pipe.execute()]
    for (key, quota, size), now in zip(checks, used, strict=True):
        if now + size > quota:
            address = address_of_info(key)
            raise MailboxFull(f"{address} holds {now} bytes, at its quota", address=address)


WATCH_TRIES = 50  # concurrent deliveries to the same mailbox make a watched write start again


async def _run_watched(r: aioredis.Redis, calls: list[tuple[str, list[str], list[Any]]],
                       checks: list[tuple[str, int, int]], replicas: ReplicaAcks | None) -> list[Any]:
    """run_atomic on one Redis with quotas: WATCH each mailbox's usage, read it, refuse
    (MailboxFull, nothing written) or write everything in one MULTI/EXEC, which Redis
    drops when a watched usage changed meanwhile (then: read again).  On a raw pooled
    connection, so that WAIT follows the writes on it."""
    info_keys = sorted({key for key, _, _ in checks})
    pool = r.connection_pool
    for _ in range(WATCH_TRIES):
        conn = await pool.get_connection()
        try:
            reads: list[tuple[Any, ...]] = [("WATCH", *info_keys),
                                            *(("HGET", key, "bytes") for key in info_keys)]
            await conn.send_packed_command(b"".join(hiredis.pack_command(c) for c in reads))
            got = [await conn.read_response() for _ in range(1 + len(info_keys))]
            used = {key: int(value or 0) for key, value in zip(info_keys, got[1:], strict=True)}
            over = [key for key, quota, size in checks if used[key] + size > quota]
            if over:
                await conn.send_packed_command(hiredis.pack_command(("UNWATCH",)))
                await conn.read_response()
            else:
                commands: list[tuple[Any, ...]] = [
                    ("MULTI",), *(("EVAL", s, len(k), *k, *a) for s, k, a in calls), ("EXEC",)]
                if replicas is not None:
                    commands.append(replicas.command())
                await conn.send_packed_command([p for c in commands for p in pack_call(c)])
                replies = await read_replies(conn, len(commands))
        except BaseException:
            await conn.disconnect()  # a reply may be left unread
            raise
        finally:
            await pool.release(conn)
        if over:
            address = address_of_info(over[0])
            raise MailboxFull(f"{address} holds {used[over[0]]} bytes, at its quota", address=address)
        executed = replies[len(calls) + 1]
        if executed is None:
            continue  # a watched mailbox changed before EXEC: nothing was written
        errors = [x for x in replies[: len(calls) + 1] + list(executed) if isinstance(x, BaseException)]
        short = replicas.shortfall(replies[len(calls) + 2 :]) if replicas is not None else None
        if errors or short is not None:
            raise errors[0] if errors else short  # type: ignore[misc]
        return list(executed)
    raise StorageError(f"mailbox usage changed under {WATCH_TRIES} tries of one write")


def deliver(r: redis.Redis, deliveries: list[Delivery], msg_id: str, raw: bytes,
            meta: dict[str, str] | None = None, how: Codec | None = None) -> None:
    """The same write from sync code (the webmail's local delivery and Sent copy).

    On a Redis Cluster: one guarded script call per slot, the message id as the
    guard, so a repeated call after a partial failure completes it.
    """
    stored = record.store(raw, summarize(raw) if meta is None else meta, how)
    now_ms = int(time.time() * 1000)
    if not is_cluster(r):
        with r.pipeline(transaction=True) as pipe:
            for d in deliveries:
                fields: dict[Any, Any] = {F.FOLDER: d.folder, F.TS: now_ms,
                                          **record.non_defaults(d.flags, d.kind)}
                record.queue_write(pipe, keys.message(d.address, msg_id), stored, fields)
                _queue_indexes(pipe, d, msg_id, len(raw), now_ms)
            pipe.execute()
        return
    groups = slot_groups(deliveries)
    for group in groups:
        keys_, args = deliver_call(group, msg_id, stored, now_ms, stats=False,
                                    digest=msg_id if len(groups) > 1 else None)
        if _evalsha_sync(r, keys_, args):
            count_stored(r, group, len(raw))


