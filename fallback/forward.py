"""The forward queue: mail for users whose mailstore is healthy, handed on to the main system.

Intake (the receiver, in the same atomic write as any mailbox copies of the
message, see `accept_async`):

* a record per recipient, `mbx:{rcpt}:fwd:<id>` (the recipient's slot): the
  exact raw bytes, the original envelope sender, created, attempts, the next
  hop's last reply;
* an entry `{a: rcpt, id: <id>}` in the shard stream `fwdq:{fN}`.

The worker (`Forwarder`) is a reliable queue like the outbound one:

* Taking: XREADGROUP (group `forwarders`) moves an entry into the group's
  pending list under this worker's consumer name; a per-record lease (SET NX
  with a TTL, refreshed while it works) keeps two workers off one record.
* Finishing: only after the next hop said 2xx is the record deleted, in one
  MULTI/EXEC with the XACK and XDEL.  Any other answer updates the record and
  moves the entry to the shard's retry zset (`fwdq:{fN}:retry`, member
  "<id>\\t<rcpt>", score = due time) in one MULTI/EXEC with the XACK.
* Reclaiming: entries a silent (crashed) worker held longer than
  claim_timeout are taken over with XAUTOCLAIM.
* Retrying: back-off with jitter from forward_retry_base, capped at
  forward_retry_max_interval.  It never gives up, never bounces and never
  drops: the recipient is a real user of the main system.  A 5xx is retried
  too and logged as an alert (the main system refusing its own user is an
  operator's problem); mail older than forward_alert_age is alerted once and
  `fallback check` warns on the queue's age.  A record whose attempts keep
  dying (max_crashes) is put back at the longest interval instead of
  crash-looping the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from fallback import keys, queueing, store
from fallback.config import Settings
from fallback.maillog import MailLog
from fallback.nexthop import NextHop
from fallback.outbound import backoff
from fallback.smarthost import Reply

log = logging.getLogger(__name__)

GROUP = keys.FORWARD_GROUP
READ_BLOCK_MS = 1000
PROMOTE_BATCH = 500
STOP_GRACE = 10.0



def queue_retry(pipe: Any, recipient: str, msg_id: str, due: float) -> None:
    """Schedule a record's next attempt in its shard's retry zset (member "<id>\\t<rcpt>")."""
    pipe.zadd(keys.forward_retry_n(keys.forward_shard(recipient)), {f"{msg_id}\t{recipient}": due})


def queue_refused(pipe: Any, recipient: str, msg_id: str, at: float | None) -> None:
    """Mark (at = time) or unmark (None) a record as refused with a 5xx, for `fallback check`."""
    key, item = keys.forward_refused_n(keys.forward_shard(recipient)), f"{msg_id}\t{recipient}"
    if at is None:
        pipe.zrem(key, item)
    else:
        pipe.zadd(key, {item: at})


def queue_forward(pipe: Any, recipient: str, msg_id: str, raw: bytes, sender: str, now: float) -> None:
    """Queue one recipient's forward record and stream entry on a (sync or async) MULTI pipeline."""
    pipe.hset(keys.forward_record(recipient, msg_id), mapping={
        "v": keys.SCHEMA_VERSION, "raw": raw, "sender": sender, "rcpt": recipient,
        "created": now, "attempts": 0})
    pipe.xadd(keys.forward_stream(recipient), {"a": recipient, "id": msg_id})


async def accept_async(r: aioredis.Redis, deliveries: list[store.Delivery], forwards: list[str],
                       msg_id: str, raw: bytes, sender: str) -> None:
    """The receiver's write when some recipients are forwarded: mailbox copies and forward
    entries in one MULTI/EXEC, so the 250 covers all of them or none.

    On a standalone Redis (or Sentinel) MULTI/EXEC spans any keys.  Redis Cluster
    refuses a transaction over several slots (stream shards and mailboxes are
    in different slots); there this must become one transaction per slot, with
    the per-recipient records written first and a sweeper that re-adds stream
    entries for records that have none, before the 250.
    """
    now = time.time()
    now_ms = int(now * 1000)
    meta = store.summarize(raw) if deliveries else {}
    async with r.pipeline(transaction=True) as pipe:
        for d in deliveries:
            store.queue_delivery(pipe, d, msg_id, raw, meta, now_ms)
        for rcpt in forwards:
            queue_forward(pipe, rcpt, msg_id, raw, sender, now)
        await pipe.execute()


def consumer_name(hostname: str) -> str:
    """Unique per process: a restarted worker must not inherit a dead one's pending list by name."""
    return f"{hostname}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Entry:
    stream: str
    entry_id: str
    recipient: str
    msg_id: str


class Forwarder:
    """One process's forward loop; start() launches tasks, stop() ends them."""

    def __init__(self, settings: Settings, r: aioredis.Redis, hostname: str | None = None) -> None:
        self.s = settings
        self.r = r
        self.hostname = hostname or settings.hostname or socket.gethostname()
        self.consumer = consumer_name(self.hostname)
        self.hop = NextHop.from_settings(settings, self.hostname)
        self.mail = MailLog()
        self.slots = asyncio.Semaphore(settings.worker_concurrency)
        self.tasks: list[asyncio.Task[None]] = []
        self.busy: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.streams = [keys.forward_stream_n(n) for n in range(keys.FORWARD_SHARDS)]
        self.tick = max(0.05, min(1.0, settings.forward_retry_base / 4))
        self.claim_tick = max(0.05, min(5.0, settings.claim_timeout / 4))

    async def start(self) -> str:
        for stream in self.streams:
            try:
                await self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.tasks = [asyncio.create_task(self._reader(), name="forward-reader"),
                      asyncio.create_task(self._scheduler(), name="forward-scheduler")]
        for task in self.tasks:
            task.add_done_callback(_report_crash)
        return (f"forward worker {self.consumer} -> {self.hop.name}, "
                f"{self.s.worker_concurrency} at a time")

    async def stop(self) -> None:
        """Stop taking work; deliveries under way get a bounded grace, then are cancelled.
        What they held stays pending and is reclaimed: a stop never loses mail."""
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        if self.busy:
            await asyncio.wait(set(self.busy), timeout=STOP_GRACE)
        for task in list(self.busy):
            task.cancel()
        if self.busy:
            await asyncio.wait(set(self.busy), timeout=5)

    # --- the loops -----------------------------------------------------------------------

    async def _reader(self) -> None:
        """Takes one entry whenever a slot is free: a dead worker's first, else a new one."""
        last_sweep = 0.0
        while not self.stopping:
            await self.slots.acquire()
            try:
                entry = None
                if time.monotonic() - last_sweep >= self.claim_tick:
                    last_sweep = time.monotonic()
                    entry = await self._reclaim_one()
                if entry is None:
                    entry = await self._read_one()
            except (RedisError, OSError) as exc:
                self.slots.release()
                log.warning("forward: reading the queue failed: %s", exc)
                await asyncio.sleep(1)
                continue
            if entry is None:
                self.slots.release()
                continue
            task = asyncio.create_task(self._run(entry))
            self.busy.add(task)
            task.add_done_callback(self.busy.discard)

    async def _read_one(self) -> Entry | None:
        reply: Any = await self.r.xreadgroup(GROUP, self.consumer, dict.fromkeys(self.streams, ">"), count=1,
                                        block=min(READ_BLOCK_MS, int(self.claim_tick * 1000)))
        if isinstance(reply, dict):  # RESP3
            reply = [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
        extra: list[Entry] = []
        for stream, batch in reply or []:
            for entry_id, fields in batch:
                extra.append(self._entry(_text(stream), _text(entry_id), fields))
        # One entry per shard may come back: the others go back to the group at once
        # (they stay pending under our name and are taken again below).
        for later in extra[1:]:
            task = asyncio.create_task(self._run_when_free(later))
            self.busy.add(task)
            task.add_done_callback(self.busy.discard)
        return extra[0] if extra else None

    async def _run_when_free(self, entry: Entry) -> None:
        await self.slots.acquire()
        await self._run(entry)

    async def _reclaim_one(self) -> Entry | None:
        min_idle = int(self.s.claim_timeout * 1000)
        for stream in self.streams:
            result = await self.r.xautoclaim(stream, GROUP, self.consumer, min_idle, start_id="0-0", count=1)
            for entry_id, fields in result[1]:
                if fields:  # None: deleted meanwhile
                    log.info("forward: reclaimed %s %s", stream, _text(entry_id))
                    return self._entry(stream, _text(entry_id), fields)
        return None

    @staticmethod
    def _entry(stream: str, entry_id: str, fields: Any) -> Entry:
        f = {_text(k): _text(v) for k, v in (fields or {}).items()}
        return Entry(stream, entry_id, f.get("a", ""), f.get("id", ""))

    async def _scheduler(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.tick)
            try:
                now = time.time()
                for n in range(keys.FORWARD_SHARDS):
                    await self.r.eval(queueing.PROMOTE_DUE, 2, keys.forward_retry_n(n),
                                      keys.forward_stream_n(n), now, PROMOTE_BATCH)
            except (RedisError, OSError) as exc:
                log.warning("forward: scheduling retries failed: %s", exc)

    async def _run(self, entry: Entry) -> None:
        try:
            await self.handle(entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left in flight on purpose: reclaimed after claim_timeout and tried again.
            log.exception("forward: entry %s of %s failed; it will be retried", entry.entry_id, entry.stream)
        finally:
            self.slots.release()

    # --- one record ----------------------------------------------------------------------

    async def handle(self, e: Entry) -> None:
        if not e.recipient or not e.msg_id:
            # No record can be named by it, so there is nothing to deliver or lose.
            log.error("forward: malformed entry %s in %s; removing it", e.entry_id, e.stream)
            await self._finish(e, None)
            return
        lease = keys.forward_lease(e.recipient, e.msg_id)
        token = f"{self.consumer}:{uuid.uuid4().hex[:8]}"
        if not await self.r.set(lease, token, nx=True, px=int(self.s.claim_timeout * 1000)):
            # Another worker has it right now (a duplicated entry): look again later.
            await self._finish(e, time.time() + self.s.claim_timeout)
            return
        done = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(e, lease, token, done))
        try:
            await self._attempt(e)
        finally:
            done.set()
            beat.cancel()
            await asyncio.wait([beat], timeout=5)
            with contextlib.suppress(RedisError, OSError):
                await self.r.eval(queueing.RELEASE_LEASE, 1, lease, token)

    async def _heartbeat(self, e: Entry, lease: str, token: str, done: asyncio.Event) -> None:
        """Keep the lease and the entry's idle time fresh while a slow delivery runs."""
        ttl = int(self.s.claim_timeout * 1000)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.s.claim_timeout / 3)
            if done.is_set():
                return
            try:
                await self.r.eval(queueing.REFRESH_LEASE, 1, lease, token, ttl)
                await self.r.xclaim(e.stream, GROUP, self.consumer, 0, [e.entry_id], justid=True)
            except (RedisError, OSError) as exc:
                log.warning("forward: heartbeat for %s failed: %s", e.entry_id, exc)

    async def _attempt(self, e: Entry) -> None:
        rec = keys.forward_record(e.recipient, e.msg_id)
        fields: Any = await self.r.hgetall(rec)
        if not fields:
            await self._finish(e, None)  # already delivered (a duplicate entry)
            return
        f = {_text(k): v for k, v in fields.items()}
        sender, raw = _text(f.get("sender", b"")), bytes(f.get("raw", b""))
        created, attempts = float(_text(f.get("created", "0"))), int(_text(f.get("attempts", "0")))
        runs = int(await self.r.hincrby(rec, "runs", 1))
        if runs > self.s.max_crashes:
            # Attempts that never finished (crashes): wait the longest interval, not a crash loop.
            log.error("forward: %s for %s was taken up %d times without finishing; next try in %gs",
                      e.msg_id, e.recipient, runs - 1, self.s.forward_retry_max_interval)
            self.mail.event("alert", id=e.msg_id, to=e.recipient, route="forward",
                            reason=f"{runs - 1} unfinished attempts")
            await self.r.hset(rec, "runs", 0)
            await self._finish(e, time.time() + self.s.forward_retry_max_interval)
            return
        reply = await self.hop.send(sender, e.recipient, raw)
        now = time.time()
        if reply.accepted:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.delete(rec)
                queue_refused(pipe, e.recipient, e.msg_id, None)
                pipe.xack(e.stream, GROUP, e.entry_id)
                pipe.xdel(e.stream, e.entry_id)
                await pipe.execute()
            self.mail.event("sent", id=e.msg_id, **{"from": sender}, to=e.recipient, route="forward",
                            relay=self.hop.name, attempts=attempts + 1, reply=reply.text)
            return
        await self._defer(e, rec, sender, created, attempts + 1, reply, now, f)

    async def _defer(self, e: Entry, rec: str, sender: str, created: float, attempts: int, reply: Reply,
                     now: float, f: dict[str, Any]) -> None:
        delay = backoff(attempts, self.s.forward_retry_base, self.s.forward_retry_max_interval)
        age = now - created
        alert_age = age >= self.s.forward_alert_age and not f.get("alerted")
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(rec, mapping={"attempts": attempts, "reply": reply.text, "code": reply.code,
                                    "last": now, "next": now + delay, "runs": 0,
                                    **({"alerted": now} if alert_age else {})})
            queue_retry(pipe, e.recipient, e.msg_id, now + delay)
            queue_refused(pipe, e.recipient, e.msg_id, now if reply.permanent else None)
            pipe.xack(e.stream, GROUP, e.entry_id)
            pipe.xdel(e.stream, e.entry_id)
            await pipe.execute()
        self.mail.event("deferred", id=e.msg_id, **{"from": sender}, to=e.recipient, route="forward",
                        attempts=attempts, retry_in=round(delay, 1), reply=reply.text)
        if reply.permanent:
            # Never bounced: the recipient is a provisioned user, so the main system refusing
            # them is a configuration problem for the operator, and the mail waits for the fix.
            log.error("forward: next hop %s refused %s for %s permanently (%s); kept and retried",
                      self.hop.name, e.msg_id, e.recipient, reply.text)
            self.mail.event("alert", id=e.msg_id, to=e.recipient, route="forward", reply=reply.text,
                            reason="permanent refusal, kept and retried")
        if alert_age:
            log.warning("forward: %s for %s has waited %.0fs (over forward_alert_age); still trying",
                        e.msg_id, e.recipient, age)
            self.mail.event("alert", id=e.msg_id, to=e.recipient, route="forward", age=round(age),
                            reason="waiting longer than forward_alert_age")

    async def _finish(self, e: Entry, retry_at: float | None) -> None:
        """Done with an entry: acknowledged and deleted; if it must come back, scheduled."""
        async with self.r.pipeline(transaction=True) as pipe:
            if retry_at is not None:
                queue_retry(pipe, e.recipient, e.msg_id, retry_at)
            pipe.xack(e.stream, GROUP, e.entry_id)
            pipe.xdel(e.stream, e.entry_id)
            await pipe.execute()


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("forward: %s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())


@dataclass
class ForwardComponent:
    """The forward worker as a service component; without forward_to, mail waits in the queue."""

    settings: Settings
    r: aioredis.Redis
    name: str = "forward"
    forwarder: Forwarder | None = None

    async def start(self) -> str:
        if not self.settings.forward_to:
            return "forward worker: off (no --forward-to); mail for users not failed over waits in the queue"
        self.forwarder = Forwarder(self.settings, self.r)
        return await self.forwarder.start()

    async def stop(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.stop()
