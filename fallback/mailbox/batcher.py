"""Group commit for the receiver's deliveries (`DeliveryBatcher`): the script calls that
arrive together share one round trip and one AOF fsync, each still its own atomic step."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.mailbox.deliverscript import DELIVER_LUA, DELIVER_SHA, pack_call, read_replies
from fallback.mailbox.durability import ReplicaAcks
from fallback.redisconn import is_cluster

if TYPE_CHECKING:
    from fallback.mailbox.delivery import Delivery

log = logging.getLogger(__name__)


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
        self.conn: Any = None  # a redis-py connection of r's pool, kept (see _connection)
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
                    pipe.execute_command("EVALSHA", DELIVER_SHA, len(keys_), *keys_, *args)
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
        """One server (or Sentinel's primary): the batch's commands written at once on the
        batcher's own connection and their replies read in order.  redis-py's Pipeline does the
        same with about twice the CPU per command, and this is the receiver's hottest path.  A
        large message goes out in pieces, itself, never copied whole (deliverscript.pack_call)."""
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", DELIVER_SHA, len(keys_), *keys_, *args) for keys_, args, _ in batch]
        if self.replicas is not None:
            commands.append(self.replicas.command())  # same connection: it covers these writes
        conn = await self._connection()
        try:
            await _write(conn, [piece for c in commands for piece in pack_call(c)])
            results = await read_replies(conn, len(commands))
        except BaseException:
            # A reply may be left unread: this connection must not be reused as it is.
            self.conn = None
            await conn.disconnect()
            await self.r.connection_pool.release(conn)
            raise
        return results

    async def _connection(self) -> Any:
        """The connection the batches go out on, kept between batches: the pool's checkout and
        release cost more than writing a batch of one (issue 17).  Before each batch it is
        checked for what Redis closed meanwhile (a restart, CLIENT KILL, its idle `timeout`),
        which the pool's checkout no longer does with redis-py 8's maintenance notifications
        on: such a connection is made anew rather than failing the batch."""
        conn = self.conn
        if conn is None:
            conn = self.conn = await self.r.connection_pool.get_connection()
        elif conn.is_connected and await conn.can_read():  # EOF or stray bytes: not reusable
            await conn.disconnect()  # the write connects again
        return conn

    async def aclose(self) -> None:
        """After the batch in flight, the kept connection goes back to the pool."""
        if self.drainer is not None and not self.drainer.done():
            await asyncio.wait([self.drainer])
        conn, self.conn = self.conn, None
        if conn is not None:
            await self.r.connection_pool.release(conn)

    async def _execute_one(self, item: tuple[list[str], list[Any], asyncio.Future[int]]) -> int:
        keys_, args, _ = item
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVAL", DELIVER_LUA, len(keys_), *keys_, *args)
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


async def _write(conn: Any, pieces: list[bytes | memoryview]) -> None:
    """Write `pieces` in order: the small ones joined, each large view on its own and drained
    before the next, so that the transport never buffers (copies) more than one piece of it."""
    small: list[bytes | memoryview] = []
    check = True
    for piece in pieces:
        if isinstance(piece, memoryview):
            if small:
                await conn.send_packed_command(b"".join(small), check_health=check)
                small, check = [], False
            await conn.send_packed_command([piece], check_health=check)
            check = False
        else:
            small.append(piece)
    if small:
        await conn.send_packed_command(b"".join(small), check_health=check)
