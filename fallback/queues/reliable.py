"""The reliable-queue machinery shared by the outbound and the forward workers.

Both queues move work the same way: sharded streams read through a consumer
group, a per-message lease (SET NX with a TTL, refreshed while working,
released by its owner only), and a retry zset per shard whose due members go
back onto the shard's stream.  `StreamWorker` is that loop; each Redis script
here touches one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

# Due members ("<id>\t<address>") of a retry zset go back onto their stream.
# KEYS: retry zset, stream; ARGV: now, batch size.
PROMOTE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local tab = string.find(m, '\\t', 1, true)
  redis.call('XADD', KEYS[2], '*', 'a', string.sub(m, tab + 1), 'id', string.sub(m, 1, tab - 1))
  redis.call('ZREM', KEYS[1], m)
end
return #due
"""

# Extend a lease, only while we still own it.  KEYS: lease; ARGV: token, ttl ms.
REFRESH_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Give a lease back, only if it is still ours.  KEYS: lease; ARGV: token.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


READ_BLOCK_MS = 1000
CLUSTER_POLL = 0.1  # seconds between polls of empty streams on a Redis Cluster
PROMOTE_BATCH = 500
STOP_GRACE = 10.0


class Flushing(Protocol):
    """What counts a worker's mail-log events (fallback.ops.metrics.Counters): flushed to Redis
    every few seconds until cancelled, then once more."""

    async def run_async(self, r: aioredis.Redis) -> None: ...


def consumer_name(hostname: str) -> str:
    """Unique per process: a restarted worker must not inherit a dead one's pending list by name."""
    return f"{hostname}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def in_flight(r: Any, stream: str, group: str, most: int = 100_000) -> set[str]:
    """The entry ids of `stream` that a worker of `group` holds unacknowledged (sync client):
    what the queue listings show as "sending".  No group yet (no worker ever ran): none."""
    try:
        pending: Any = r.xpending_range(stream, group, min="-", max="+", count=most)
    except ResponseError:
        return set()
    return {text(p["message_id"]) for p in pending}


def stream_pairs(reply: Any) -> list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]]:
    """XREADGROUP's answer as (stream, entries) pairs, for RESP2 (list) and RESP3 (dict) alike."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
    return [(stream, entries) for stream, entries in reply]


async def cancel_all(tasks: list[asyncio.Task[None]], label: str) -> None:
    """Cancel and wait; again if a library swallowed the first cancellation (redis-py can,
    mid-command), which would otherwise leave a loop running after stop()."""
    for _ in range(10):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1)
    log.error("%s: %d task(s) would not stop", label, len([t for t in tasks if not t.done()]))


class StreamWorker:
    """The loop both queues run; subclasses say what handling one entry means (`handle`).

    * Taking: entries are read through the consumer group only when a slot is
      free (at most `concurrency` under way), so nothing taken sits idle here
      while another worker could deliver it.
    * Reclaiming: entries a silent (crashed) worker held longer than
      `claim_timeout` are taken over with XAUTOCLAIM, at most every claim_tick.
    * Retrying: due members of the retry zsets go back onto their streams.
    * Leasing: `while_leased` keeps a message's lease and its entry's idle
      time fresh while a slow delivery runs, and gives the lease back after.
    * Failing: an entry whose handling raises stays in flight on purpose and
      is reclaimed after claim_timeout.
    """

    label = "queue"

    def __init__(self, r: aioredis.Redis, *, group: str, streams: list[str],
                 retry: list[tuple[str, str]], consumer: str, concurrency: int,
                 claim_timeout: float, retry_base: float, counters: Flushing | None = None) -> None:
        self.r = r
        self.counters = counters
        self.flusher: asyncio.Task[None] | None = None
        self.clustered = is_cluster(r)
        self.group = group
        self.streams = streams
        self.retry = retry  # (retry zset, its stream) per shard
        self.consumer = consumer
        self.claim_timeout = claim_timeout
        self.slots = asyncio.Semaphore(concurrency)
        self.tasks: list[asyncio.Task[None]] = []
        self.busy: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.tick = max(0.05, min(1.0, retry_base / 4))
        self.claim_tick = max(0.05, min(5.0, claim_timeout / 4))

    async def handle(self, stream: str, entry_id: str, fields: dict[Any, Any]) -> None:
        raise NotImplementedError

    # --- lifecycle -----------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.r.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def start_loops(self) -> None:
        await self.ensure_groups()
        self.tasks = [asyncio.create_task(self._reader(), name=f"{self.label}-reader"),
                      asyncio.create_task(self._scheduler(), name=f"{self.label}-scheduler")]
        for task in self.tasks:
            task.add_done_callback(self._report_crash)
        if self.counters is not None:
            self.flusher = asyncio.create_task(self.counters.run_async(self.r), name=f"{self.label}-counts")

    async def stop(self) -> None:
        """Stop taking work; let deliveries under way finish (bounded), then cancel.

        Entries taken but not finished stay in the pending list and are
        reclaimed by a worker after claim_timeout: a stop never loses work.
        """
        self.stopping = True
        await cancel_all(self.tasks, self.label)
        if self.busy:
            await asyncio.wait(set(self.busy), timeout=STOP_GRACE)
        await cancel_all(list(self.busy), self.label)
        if self.flusher is not None:  # after the deliveries: their counts are flushed too
            await cancel_all([self.flusher], self.label)

    def _report_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s: %s stopped: %r", self.label, task.get_name(), task.exception(),
                         exc_info=task.exception())

    # --- the loops -----------------------------------------------------------------------

    async def _reader(self) -> None:
        """Takes work whenever a slot is free: first what a silent worker held too long,
        else new entries (one XREADGROUP over every shard, blocking briefly; see _read_new).  One loop,
        so the two never compete for the slots."""
        last_sweep = 0.0
        while not self.stopping:
            await self.slots.acquire()
            try:
                entries: list[tuple[str, str, dict[Any, Any]]] = []
                if time.monotonic() - last_sweep >= self.claim_tick:
                    last_sweep = time.monotonic()
                    entries = await self._reclaim_one()
                if not entries:
                    entries = await self._read_new()
            except (RedisError, OSError) as exc:
                self.slots.release()
                log.warning("%s: reading the queue failed: %s", self.label, exc)
                await asyncio.sleep(1)
                continue
            if not entries:
                self.slots.release()
            for n, entry in enumerate(entries):
                if n:  # one entry per shard may come back: each needs its own slot
                    await self.slots.acquire()
                self._spawn(*entry)

    async def _read_new(self) -> list[tuple[str, str, dict[Any, Any]]]:
        block = min(READ_BLOCK_MS, int(self.claim_tick * 1000))
        if not self.clustered:
            reply = await self.r.xreadgroup(self.group, self.consumer, dict.fromkeys(self.streams, ">"),
                                            count=1, block=block)
            return [(text(stream), text(entry_id), fields)
                    for stream, batch in stream_pairs(reply) for entry_id, fields in batch]
        # A Redis Cluster refuses one XREADGROUP over streams in different slots, and a
        # blocking read per shard would tie up a connection each: poll every shard at
        # once (one round trip per node), and rest briefly when all are empty.
        async with self.r.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xreadgroup(self.group, self.consumer, {stream: ">"}, count=1)
            replies = await pipe.execute()
        found = [(text(stream), text(entry_id), fields) for reply in replies
                 for stream, batch in stream_pairs(reply) for entry_id, fields in batch]
        if not found:
            await asyncio.sleep(CLUSTER_POLL)
        return found

    async def _reclaim_one(self) -> list[tuple[str, str, dict[Any, Any]]]:
        min_idle = int(self.claim_timeout * 1000)
        for stream in self.streams:
            result = await self.r.xautoclaim(stream, self.group, self.consumer, min_idle,
                                             start_id="0-0", count=1)
            claimed = [(stream, text(e), f) for e, f in result[1] if f]  # None: deleted meanwhile
            if claimed:
                log.info("%s: reclaimed %s %s", self.label, stream, claimed[0][1])
                return claimed
        return []

    async def _scheduler(self) -> None:
        """Retries that are due go back onto their stream."""
        while not self.stopping:
            await asyncio.sleep(self.tick)
            try:
                now = time.time()
                for zset, stream in self.retry:
                    await self.r.eval(PROMOTE_DUE, 2, zset, stream, now, PROMOTE_BATCH)
            except (RedisError, OSError) as exc:
                log.warning("%s: scheduling retries failed: %s", self.label, exc)

    def _spawn(self, stream: str, entry_id: str, fields: dict[Any, Any]) -> None:
        """Handle one entry in its own task; the slot taken for it is given back at the end."""
        task = asyncio.create_task(self._run(stream, entry_id, fields))
        self.busy.add(task)
        task.add_done_callback(self.busy.discard)

    async def _run(self, stream: str, entry_id: str, fields: dict[Any, Any]) -> None:
        try:
            await self.handle(stream, entry_id, fields)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left in flight on purpose: reclaimed after claim_timeout and tried again.
            log.exception("%s: entry %s of %s failed; it will be retried", self.label, entry_id, stream)
        finally:
            self.slots.release()

    # --- one message ---------------------------------------------------------------------

    async def while_leased(self, stream: str, entry_id: str, lease: str, token: str,
                           work: Awaitable[None]) -> None:
        """Run `work` holding the lease; keep it (and the entry) fresh; give it back after."""
        done = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(stream, entry_id, lease, token, done))
        try:
            await work
        finally:
            # An event, not only cancel(): redis-py may swallow a cancellation that lands
            # mid-command, and a heartbeat that never ends would hold this slot forever.
            done.set()
            beat.cancel()
            await asyncio.wait([beat], timeout=5)
            with contextlib.suppress(RedisError, OSError):
                await self.r.eval(RELEASE_LEASE, 1, lease, token)

    async def _heartbeat(self, stream: str, entry_id: str, lease: str, token: str,
                         done: asyncio.Event) -> None:
        ttl = int(self.claim_timeout * 1000)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.claim_timeout / 3)
            if done.is_set():
                return
            try:
                await self.r.eval(REFRESH_LEASE, 1, lease, token, ttl)
                await self.r.xclaim(stream, self.group, self.consumer, 0, [entry_id], justid=True)
            except (RedisError, OSError) as exc:
                log.warning("%s: heartbeat for %s failed: %s", self.label, entry_id, exc)
