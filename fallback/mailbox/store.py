"""Mailboxes in Redis: the atomic delivery of a message, and reading it back.

A message is one hash (`mbx:{addr}:m:<id>`) holding the exact bytes in `raw`
plus small display metadata, indexed in one sorted set per folder.  Delivery
to every recipient is one MULTI/EXEC: it either all happened or none did,
which is what lets the receiver answer 250.  Metadata is parsed from the
headers only for display; the raw bytes are never rewritten.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.header
import email.utils
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from fallback import keys
from fallback.mailbox.durability import ReplicaAcks
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

INBOX, SENT, TRASH = "INBOX", "Sent", "Trash"
FOLDERS = (INBOX, SENT, TRASH)
SEEN, FLAGGED, ANSWERED, FORWARDED = "\\Seen", "\\Flagged", "\\Answered", "$Forwarded"
SUMMARY_FIELDS = ("folder", "flags", "ts", "size", "from", "to", "subject", "date", "attach", "kind")
_HEADER_LIMIT = 512  # display metadata is truncated: the raw bytes keep everything


@dataclass(frozen=True)
class Delivery:
    """One message for one mailbox."""

    address: str
    mailstore: str
    folder: str = INBOX
    flags: tuple[str, ...] = ()
    kind: str = "received"


_SUMMARY_HEADERS = {"from": b"from", "to": b"to", "cc": b"cc", "subject": b"subject", "date": b"date",
                    "msgid": b"message-id", "ctype": b"content-type"}
_SUMMARY_NAMES = frozenset(_SUMMARY_HEADERS.values())


def _header_fields(head: bytes) -> dict[bytes, list[bytes]]:
    """First occurrence of each header we display, with its folded lines.

    A hand-rolled scan, not the email package: its header registry costs about a
    millisecond a message, which the receiver would spend on its event loop.
    """
    found: dict[bytes, list[bytes]] = {}
    current: bytes | None = None
    for line in head.splitlines():
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                found[current].append(line)
            continue
        name, sep, value = line.partition(b":")
        key = name.strip().lower()
        current = key if sep and key in _SUMMARY_NAMES and key not in found else None
        if current is not None:
            found[current] = [value]
    return found


def _display(parts: list[bytes] | None) -> str:
    """Unfolded, RFC 2047 decoded, whitespace collapsed, bounded; never raises."""
    if not parts:
        return ""
    text = " ".join(b" ".join(parts).decode("utf-8", "replace").split())
    if "=?" in text:
        # A malformed encoded word is shown as it came.
        with contextlib.suppress(Exception):
            text = " ".join(str(email.header.make_header(email.header.decode_header(text))).split())
    return text[:_HEADER_LIMIT]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def summarize(raw: bytes) -> dict[str, str]:
    """Display metadata parsed from the headers; never raises on malformed input."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 4]
    fields = _header_fields(head)
    # NUL never reaches display metadata (it also separates the scripted write's fields).
    out = {key: _display(fields.get(name)).replace("\0", "") for key, name in _SUMMARY_HEADERS.items()}
    ctype = out.pop("ctype").lower()
    has_attach = ctype.startswith("multipart/mixed") or b"attachment;" in raw[:1_000_000].lower()
    out["attach"] = "1" if has_attach else "0"
    return out


def queue_delivery(pipe: Any, d: Delivery, msg_id: str, raw: bytes, meta: dict[str, str],
                   now_ms: int, stats: bool = True) -> None:
    """Queue one mailbox's writes on a (sync or async) MULTI pipeline.

    `stats=False` on a Redis Cluster, where the stats shard is another slot:
    the caller then adds the counts afterwards (`count_stored`).
    """
    fields: dict[str, Any] = {
        "v": keys.SCHEMA_VERSION, "raw": raw, "folder": d.folder, "flags": " ".join(d.flags),
        "ts": now_ms, "size": len(raw), "kind": d.kind, "rstate": "pending", **meta,
    }
    pipe.hset(keys.message(d.address, msg_id), mapping=fields)
    pipe.zadd(keys.folder(d.address, d.folder), {msg_id: now_ms})
    if SEEN not in d.flags:
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
    common = ["v", keys.SCHEMA_VERSION, "ts", str(now_ms), "size", str(len(raw)), "rstate", "pending"]
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
        args += [d.folder, " ".join(d.flags), d.kind, d.mailstore, "1" if SEEN in d.flags else "0"]
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


def received_header(msg_id: str, hostname: str, helo: str, peer_ip: str, rdns: str | None,
                    protocol: str, recipient: str | None) -> bytes:
    """Our trace line; carries the unique id that reconcile searches for after a crash."""
    helo = _sanitize(helo) or "unknown"
    client = f"{helo} ({_sanitize(rdns) + ' ' if rdns else ''}[{_sanitize(peer_ip)}])"
    line = f"Received: from {client}\r\n\tby {_sanitize(hostname)} (fallback) with {protocol} id {msg_id}"
    if recipient:
        line += f"\r\n\tfor <{_sanitize(recipient)}>"
    line += f"; {email.utils.formatdate(localtime=False)}\r\n"
    return line.encode("ascii")


_UNSAFE_IN_TRACE = re.compile(r"[^\x21-\x7e]|[()<>;]")


def _sanitize(text: str | None) -> str:
    """Client-supplied names go into a header: printable ASCII only, no CR/LF, bounded."""
    if not text:
        return ""
    return _UNSAFE_IN_TRACE.sub("?", text[:200])


class MailboxReader:
    """Sync reads of one mailbox (export, webmail, status)."""

    def __init__(self, r: redis.Redis, address: str) -> None:
        self.r = r
        self.address = address

    def count(self, folder: str) -> int:
        return int(self.r.zcard(keys.folder(self.address, folder)))

    def ids(self, folder: str, start: int = 0, stop: int = -1, newest_first: bool = True) -> list[str]:
        key = keys.folder(self.address, folder)
        raw = (self.r.zrevrange(key, start, stop) if newest_first
               else self.r.zrange(key, start, stop))
        return [i.decode() for i in raw]  # type: ignore[union-attr]

    def raw(self, msg_id: str) -> bytes | None:
        return self.r.hget(keys.message(self.address, msg_id), "raw")  # type: ignore[return-value]

    def meta(self, msg_id: str) -> dict[str, str] | None:
        fields = self.r.hgetall(keys.message(self.address, msg_id))
        if not fields:
            return None
        return {k.decode(): v.decode("utf-8", "replace")  # type: ignore[union-attr]
                for k, v in fields.items() if k != b"raw"}

    def iter_messages(self, folders: tuple[str, ...] = FOLDERS,
                      batch: int = 100) -> Iterator[tuple[str, dict[str, str], bytes]]:
        """(id, metadata, raw) in receive order, folder by folder, pipelined in batches."""
        for name in folders:
            ids = self.ids(name, newest_first=False)
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                pipe = self.r.pipeline(transaction=False)
                for msg_id in chunk:
                    pipe.hgetall(keys.message(self.address, msg_id))
                for msg_id, fields in zip(chunk, pipe.execute(), strict=True):
                    if not fields:
                        continue  # deleted between the index read and now
                    raw = fields.pop(b"raw", b"")
                    meta = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                    yield msg_id, meta, raw

    def info(self) -> dict[str, int]:
        fields = self.r.hgetall(keys.info(self.address))
        return {k.decode(): int(v) for k, v in fields.items()
                if k in (b"messages", b"bytes")}


def mailstore_stats(r: redis.Redis) -> dict[str, dict[str, int]]:
    """messages and bytes per mailstore, summed over the stats shards."""
    pipe = r.pipeline(transaction=False)
    for n in range(keys.STATS_SHARDS):
        pipe.hgetall(keys.stats_shard_n(n))
    out: dict[str, dict[str, int]] = {}
    for shard in pipe.execute():
        for field, value in shard.items():
            mailstore, _, what = field.decode().partition("\t")
            bucket = out.setdefault(mailstore, {"messages": 0, "bytes": 0})
            bucket[what] = bucket.get(what, 0) + int(value)
    return out


def _change_watched(r: redis.Redis, key: str, fields: tuple[str, ...],
                    change: Callable[[Any, list[str]], None]) -> bool:
    """Read `fields` of a message under WATCH, then queue `change` in one MULTI; retried when
    the message changed meanwhile.  False (nothing written) when the message is gone."""
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                values = pipe.hmget(key, fields)
                if values[0] is None:
                    pipe.reset()
                    return False
                pipe.multi()
                change(pipe, [_text(v) if v is not None else "" for v in values])
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def set_flags(r: redis.Redis, address: str, msg_id: str, add: tuple[str, ...] = (),
              remove: tuple[str, ...] = ()) -> bool:
    """Change a message's flags; marks it for reconcile.  False when the message is gone."""

    def change(pipe: Any, values: list[str]) -> None:
        flags = [f for f in values[0].split() if f not in remove]
        flags += [f for f in add if f not in flags]
        pipe.hset(keys.message(address, msg_id), "flags", " ".join(flags))
        if SEEN in flags:
            pipe.srem(keys.unseen(address), msg_id)
        else:
            pipe.sadd(keys.unseen(address), msg_id)
        # Reconcile carries flag changes made after a message was appended.
        pipe.sadd(keys.pending(address), msg_id)

    return _change_watched(r, keys.message(address, msg_id), ("flags",), change)


def move(r: redis.Redis, address: str, msg_id: str, folder: str) -> bool:
    """Move a message between folders (delete = move to Trash); marks it for reconcile."""
    if folder not in FOLDERS:
        raise ValueError(f"unknown folder {folder!r}")

    def change(pipe: Any, values: list[str]) -> None:
        old, ts = values
        pipe.hset(keys.message(address, msg_id), "folder", folder)
        pipe.zrem(keys.folder(address, old), msg_id)
        pipe.zadd(keys.folder(address, folder), {msg_id: int(ts or 0)})
        pipe.sadd(keys.pending(address), msg_id)

    return _change_watched(r, keys.message(address, msg_id), ("folder", "ts"), change)


# The webmail's folder views: one page of summaries in two round trips, whatever the folder's size.
LIST_FIELDS = ("flags", "ts", "size", "from", "to", "subject", "attach", "kind", "folder")
SEARCH_LIMIT = 20000  # newest messages a search looks at; bounds the work of one request


def _summary(msg_id: str, values: list[Any]) -> dict[str, str]:
    row = {name: v.decode("utf-8", "replace") if isinstance(v, bytes) else (v or "")
           for name, v in zip(LIST_FIELDS, values, strict=True)}
    row["id"] = msg_id
    return row


# One round trip for a whole folder page.  Every key it reads is this mailbox's
# (one hash tag, one cluster slot); the message keys are built from the prefix.
_LIST_PAGE_LUA = """
local total = redis.call('ZCARD', KEYS[1])
local unread = redis.call('ZINTERCARD', 2, KEYS[2], KEYS[3], 'LIMIT', ARGV[4])
local ids = redis.call('ZREVRANGE', KEYS[1], ARGV[2], ARGV[3])
local out = {total, unread, ids}
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
for _, id in ipairs(ids) do
  out[#out + 1] = redis.call('HMGET', ARGV[1] .. id, unpack(fields))
end
return out
"""


def list_page(r: redis.Redis, address: str, folder: str, start: int, count: int,
              unread_limit: int = 1000) -> tuple[int, list[dict[str, str]], int]:
    """(messages in folder, summaries of `count` messages from `start` newest first,
    unread messages in INBOX counted up to `unread_limit`).

    A Lua script rather than pipelines: on a busy threaded web worker every
    round trip is another wait for the interpreter lock, so one beats three.
    """
    script = r.register_script(_LIST_PAGE_LUA)
    reply: Any = script(keys=[keys.folder(address, folder), keys.folder(address, INBOX),
                              keys.unseen(address)],
                        args=[keys.message(address, ""), start, start + count - 1, unread_limit,
                              *LIST_FIELDS])
    total, unread, raw_ids, values = reply[0], reply[1], reply[2], reply[3:]
    ids = [_text(i) for i in raw_ids]
    # A message moved or deleted between the index read and now has no fields: leave it out.
    rows = [_summary(i, v) for i, v in zip(ids, values, strict=True) if v[1] is not None]
    return int(total), rows, int(unread)


def summaries(r: redis.Redis, address: str, ids: list[str]) -> list[dict[str, str]]:
    if not ids:
        return []
    with r.pipeline(transaction=False) as pipe:
        for msg_id in ids:
            pipe.hmget(keys.message(address, msg_id), LIST_FIELDS)
        results = pipe.execute()
    # A message moved or deleted between the two reads has no fields: leave it out.
    return [_summary(i, v) for i, v in zip(ids, results, strict=True) if v[1] is not None]


def search(r: redis.Redis, address: str, folder: str, query: str, start: int, count: int,
           batch: int = 500) -> tuple[int, list[dict[str, str]]]:
    """Messages whose sender or subject contains `query` (case-insensitive), newest first.

    A scan of the newest SEARCH_LIMIT messages in pipelined batches: at the sizes a
    fallback mailbox reaches (days of mail) this beats keeping a search index.
    """
    needle = query.casefold()
    found: Any = r.zrevrange(keys.folder(address, folder), 0, SEARCH_LIMIT - 1)
    ids = [_text(i) for i in found]
    matches: list[str] = []
    for pos in range(0, len(ids), batch):
        chunk = ids[pos : pos + batch]
        with r.pipeline(transaction=False) as pipe:
            for msg_id in chunk:
                pipe.hmget(keys.message(address, msg_id), ("from", "subject"))
            for msg_id, (sender, subject) in zip(chunk, pipe.execute(), strict=True):
                if sender is None and subject is None:
                    continue
                if needle in (_text(sender or b"") + "\n" + _text(subject or b"")).casefold():
                    matches.append(msg_id)
    return len(matches), summaries(r, address, matches[start : start + count])


def unseen_count(r: redis.Redis, address: str, folder: str, limit: int = 1000) -> int:
    """Unread messages in one folder, counted up to `limit` (the unseen set is per mailbox)."""
    return int(r.execute_command("ZINTERCARD", 2, keys.folder(address, folder), keys.unseen(address),
                                 "LIMIT", limit))


def message_exists(r: redis.Redis, address: str, msg_id: str) -> bool:
    return bool(r.exists(keys.message(address, msg_id)))


def note_local_recipients(r: redis.Redis, address: str, msg_id: str, recipients: list[str]) -> None:
    """Record, on a sent message, which recipients had a mailbox here (display only)."""
    if recipients:
        r.hset(keys.message(address, msg_id), "local", " ".join(recipients))


# KEYS: message, pending, outbox, the three folder zsets, unseen, info.  ARGV: id, cutoff (ms).
# Deletes only a message that reconcile finished (done, nothing pending, no outbound delivery
# left) at or before the cutoff; returns its size, or -1 when it must stay.
_PURGE_LUA = """
if redis.call('HGET', KEYS[1], 'rstate') ~= 'done' then return -1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return -1 end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return -1 end
local when = tonumber(redis.call('HGET', KEYS[1], 'rts') or redis.call('HGET', KEYS[1], 'ts') or '0')
if when > tonumber(ARGV[2]) then return -1 end
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
redis.call('DEL', KEYS[1])
for i = 4, 6 do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call('SREM', KEYS[7], ARGV[1])
redis.call('HINCRBY', KEYS[8], 'messages', -1)
redis.call('HINCRBY', KEYS[8], 'bytes', -size)
return size
"""


def delete_reconciled(r: redis.Redis, address: str, msg_ids: list[str], cutoff_ms: int) -> tuple[int, int]:
    """Delete messages reconcile has finished with (see _PURGE_LUA); (count, bytes) deleted.

    The per-mailbox keys change atomically per message; the sharded stats
    counters (another slot) follow in a second step.
    """
    mbx_keys = [keys.pending(address), keys.outbox(address),
                *(keys.folder(address, f) for f in FOLDERS), keys.unseen(address), keys.info(address)]
    pipe = r.pipeline(transaction=False)
    for msg_id in msg_ids:
        # EVAL by hand: redis-py refuses script objects in a cluster pipeline.
        pipe.execute_command("EVAL", _PURGE_LUA, 1 + len(mbx_keys), keys.message(address, msg_id),
                             *mbx_keys, msg_id, cutoff_ms)
    sizes = [int(x) for x in pipe.execute() if int(x) >= 0]
    if sizes:
        stored: Any = r.hget(keys.info(address), "mailstore")
        mailstore = _text(stored or b"default")
        pipe = r.pipeline(transaction=False)
        pipe.hincrby(keys.stats_shard(address), f"{mailstore}\tmessages", -len(sizes))
        pipe.hincrby(keys.stats_shard(address), f"{mailstore}\tbytes", -sum(sizes))
        pipe.execute()
    return len(sizes), sum(sizes)
