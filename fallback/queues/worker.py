"""The outbound worker: drains the outbound queue into the smarthost, reliably.

How work moves (every step is atomic in Redis; see docs/outbound.md):

* Taking: XREADGROUP on the shard streams moves an entry into the group's
  pending list (in flight) under this worker's consumer name.
* Owning: before touching the smarthost the worker takes the message's lease
  (SET NX with a TTL, refreshed while it works), so two workers never deliver
  one message at the same time, even if its entry was duplicated or reclaimed.
* Recording: each attempt's per-recipient outcome, and the failure notice for
  recipients that failed, are one MULTI/EXEC on the sender's keys.  Only then
  is the entry acknowledged (and, if recipients remain, the message put in
  the shard's retry zset in the same MULTI as the XACK).
* Reclaiming: entries idle in a dead worker's pending list longer than
  claim_timeout are taken over with XAUTOCLAIM and continued.
* Poison: the record counts attempts that started but never finished; past
  max_crashes the message is parked in the shard's dead-letter zset.
* Retrying: due members of the retry zsets go back onto their stream (Lua,
  one shard at a time).
* Holding: a sender the operator holds (fallback/queues/hold.py) is seen by
  the take script before the lease or the attempt count: the entry goes back
  to the retry zset for hold.RECHECK seconds, no attempt is made or counted,
  and time held is added to the retry deadline.

The taking, reclaiming, retrying and leasing loop is fallback.queues.reliable.StreamWorker,
shared with the forward queue; this module is what one outbound message means.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from fallback import ids, keys
from fallback.config import Settings
from fallback.errors import FallbackError
from fallback.mailbox import delivery
from fallback.mailbox.record import LUA as RECORD_LUA  # the Sent copy's bytes, any layout (issue 17)
from fallback.mailbox.record import raw_of
from fallback.maillog import MailLog
from fallback.queues import delayed, dsn, hold, outbound, reliable
from fallback.queues.dkim import Signer
from fallback.queues.outbound import DEFERRED, DELIVERED, FAILED, Record
from fallback.queues.smarthost import Reply, Smarthost
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

# Taking a message: lease, attempt count and what to send in one round trip (one slot:
# every key is the sender's).  {0}: someone else holds it; {1}: no record; {2, runs, record, raw};
# {3}: the operator holds the sender's mail.  Taking ends the time to undo it (queues/delayed.py).
_TAKE = RECORD_LUA + """
if redis.call('EXISTS', KEYS[4]) == 1 then return {3} end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {1} end
redis.call('HDEL', KEYS[2], 'undo')
local runs = redis.call('HINCRBY', KEYS[2], 'runs', 1)
return {2, runs, redis.call('HGETALL', KEYS[2]), raw_of(KEYS[3])}
"""




class Worker(reliable.StreamWorker):
    """One worker process's delivery loop; start() launches tasks, stop() ends them."""

    label = "outbound"

    def __init__(self, settings: Settings, r: aioredis.Redis, hostname: str | None = None,
                 consumer: str | None = None, mail: MailLog | None = None,
                 counters: reliable.Flushing | None = None) -> None:
        self.s = settings
        self.hostname = hostname or settings.hostname or socket.gethostname()
        super().__init__(
            r, group=keys.OUTBOUND_GROUP,
            streams=[keys.outbound_stream_n(n) for n in range(keys.OUTBOUND_SHARDS)],
            retry=[(keys.outbound_retry_n(n), keys.outbound_stream_n(n))
                   for n in range(keys.OUTBOUND_SHARDS)],
            consumer=consumer or reliable.consumer_name(self.hostname),
            concurrency=settings.worker_concurrency, claim_timeout=settings.claim_timeout,
            retry_base=settings.retry_base, counters=counters)
        self.smarthost = Smarthost.from_settings(settings, self.hostname)
        self.signer = (Signer(settings.dkim_selector, settings.dkim_key_dir)
                       if settings.dkim_selector and settings.dkim_key_dir else None)
        # Counted for /metrics when the owner passes a counting log and its counters.
        self.mail = mail or MailLog()

    async def start(self) -> str:
        await self.start_loops()
        dkim = f", DKIM selector {self.s.dkim_selector}" if self.signer else ""
        return (f"outbound worker {self.consumer} -> smarthost {self.smarthost.name} "
                f"({self.s.smarthost_tls}{dkim}), {self.s.worker_concurrency} at a time")

    # --- one message ---------------------------------------------------------------------

    async def handle(self, stream: str, entry_id: str, fields: dict[Any, Any]) -> None:
        f = {reliable.text(k): reliable.text(v) for k, v in fields.items()}
        sender, msg_id = f.get("a", ""), f.get("id", "")
        if not sender or not msg_id:
            log.error("outbound: malformed entry %s in %s: %r; parking it", entry_id, stream, f)
            await self._park(stream, entry_id, msg_id or entry_id, sender or "?", "malformed queue entry")
            return
        lease = keys.outbound_lease(sender, msg_id)
        token = f"{self.consumer}:{uuid.uuid4().hex[:8]}"
        ttl = int(self.s.claim_timeout * 1000)
        taken: Any = await self.r.eval(_TAKE, 4, lease, keys.outbound_record(sender, msg_id),
                                       keys.message(sender, msg_id), keys.outbound_hold(sender),
                                       token, ttl)
        if taken[0] == 3:
            # Held by the operator: not an attempt, nothing counted; release makes it due again.
            await self._ack(stream, entry_id, sender, msg_id, time.time() + hold.RECHECK)
            return
        if taken[0] == 0:
            # Another worker has it right now (a duplicate entry): look again later.
            await self._ack(stream, entry_id, sender, msg_id, time.time() + self.s.claim_timeout)
            return
        await self.while_leased(stream, entry_id, lease, token,
                                self._taken(stream, entry_id, sender, msg_id, taken))

    async def _taken(self, stream: str, entry_id: str, sender: str, msg_id: str, taken: Any) -> None:
        if taken[0] == 1:
            if outbound.entry_age(entry_id) < outbound.SUBMIT_GRACE:
                # On a Redis Cluster the entry is written just before the record (outbound.submit):
                # it may be a moment early.  Look again shortly.
                await self._ack(stream, entry_id, sender, msg_id, time.time() + 1)
                return
            # Deleted by the operator, or never fully submitted: nothing to deliver.
            await self._ack(stream, entry_id, sender, msg_id, None)
            return
        flat = taken[2]
        record = dict(zip(flat[::2], flat[1::2], strict=True))
        await self._attempt(stream, entry_id, sender, msg_id, int(taken[1]), record,
                            raw_of(taken[3]) if len(taken) > 3 else None)

    async def _attempt(self, stream: str, entry_id: str, sender: str, msg_id: str, runs: int,
                       record: dict[Any, Any], raw: bytes | None) -> None:
        if runs > self.s.max_crashes:
            await self._park(stream, entry_id, msg_id, sender,
                             f"taken up {runs - 1} times without finishing (crash or error)")
            return
        rec = outbound.parse_record(msg_id, record)
        now = time.time()
        later = {reliable.text(k): v for k, v in record.items()}
        if later.get(delayed.LATER) and raw is not None:
            # Undo send: the copies for mailboxes here and the forward queue waited with it.
            await delayed.release(self.r, sender, msg_id, later, raw, self.mail)
        deadline = rec.created + rec.held + self.s.retry_deadline
        updates: dict[str, dict[str, Any]] = {}
        failed: list[str] = []
        for address in rec.pending():
            if now >= deadline:
                st = rec.rcpts[address]
                reply = st.get("reply") or "no attempt was made"
                updates[address] = {**st, "state": FAILED, "next": 0, "status": "4.4.7",
                                    "reply": f"gave up after {_span(self.s.retry_deadline)}: {reply}"}
                failed.append(address)
        due = [a for a in rec.pending() if a not in updates
               and float(rec.rcpts[a].get("next") or 0) <= now + 0.001]
        if due:
            if raw is None:
                replies = {a: Reply(554, "554 5.3.0 the message was removed before it could be sent")
                           for a in due}
            else:
                replies = await self._send(rec, due, raw)
            now = time.time()
            for address, reply in replies.items():
                st = rec.rcpts[address]
                attempts = int(st.get("attempts", 0)) + 1
                new = {**st, "attempts": attempts, "reply": reply.text, "code": reply.code, "last": now}
                if reply.accepted:
                    new.update(state=DELIVERED, next=0)
                    self.mail.sent(msg_id, sender, address, reply=reply.text, peer=self.smarthost.name,
                                   attempts=attempts)
                elif reply.permanent:
                    new.update(state=FAILED, next=0)
                    failed.append(address)
                    self.mail.bounced(msg_id, sender, address, reply=reply.text)
                else:
                    delay = outbound.backoff(attempts, self.s.retry_base, self.s.retry_max_interval)
                    new.update(state=DEFERRED, next=min(now + delay, deadline))
                    self.mail.deferred(msg_id, sender, address, reason="temporary failure, retried",
                                       route="outbound", reply=reply.text, attempts=attempts,
                                       retry_in=round(new["next"] - now, 1))
                updates[address] = new
        notice = None
        if failed:
            rec.rcpts.update(updates)
            notice = (ids.new_id(), dsn.build(self.hostname, rec, failed, raw or b"",
                                              self.smarthost.name, now))
        clustered = is_cluster(self.r)
        async with self.r.pipeline(transaction=True) as pipe:
            finished = outbound.queue_outcome(pipe, rec, updates, now, notice, stats=not clustered)
            await pipe.execute()
        if notice is not None and clustered:
            await delivery.count_stored_async(
                self.r, [delivery.Delivery(rec.sender, rec.mailstore)], len(notice[1]))
        if notice is not None:
            for address in failed:
                self.mail.failed(msg_id, sender, address, reason="refused by the smarthost; the sender "
                                 "was sent a notice", stage="outbound", notice=notice[0])
        await self._ack(stream, entry_id, sender, msg_id, None if finished else rec.next_due())

    async def _send(self, rec: Record, due: list[str], raw: bytes) -> dict[str, Reply]:
        payload = outbound.ensure_headers(raw, rec.sender, rec.msg_id, rec.created)
        if self.signer is not None:
            try:
                payload = self.signer.sign(payload, rec.sender)
            except FallbackError as exc:
                log.error("outbound: %s", exc)
                return {a: Reply(0, f"local problem: {exc}") for a in due}
        return await self.smarthost.send(rec.sender, due, payload)

    async def _ack(self, stream: str, entry_id: str, sender: str, msg_id: str,
                   retry_at: float | None) -> None:
        """Finish with an entry: acknowledged, deleted, and if due again, scheduled."""
        n = _shard_of(stream)
        async with self.r.pipeline(transaction=True) as pipe:
            if retry_at is not None:
                pipe.zadd(keys.outbound_retry_n(n), {outbound.member(msg_id, sender): retry_at})
            pipe.xack(stream, keys.OUTBOUND_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def _park(self, stream: str, entry_id: str, msg_id: str, sender: str, reason: str) -> None:
        """Dead letter: kept for the operator (`fallback queue list`), never dropped."""
        now = time.time()
        rec_key = keys.outbound_record(sender, msg_id)
        if sender != "?" and await self.r.exists(rec_key):
            await self.r.hset(rec_key, mapping={"dead": reason, "parked": now})
        n = _shard_of(stream)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.outbound_dead_n(n), {outbound.member(msg_id, sender): now})
            pipe.xack(stream, keys.OUTBOUND_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()
        self.mail.failed(msg_id, sender, None, reason=f"parked as dead letter: {reason}", stage="outbound",
                         outcome="dead-letter")





def _shard_of(stream: str) -> int:
    """outq:{q5} -> 5."""
    return int(stream.rpartition("{q")[2].rstrip("}"))


def _span(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds:g} seconds"


async def run(settings: Settings, r: aioredis.Redis, stop: asyncio.Event, mail: MailLog | None = None,
              counters: reliable.Flushing | None = None) -> None:
    """`fallback worker`: run until `stop` is set."""
    worker = Worker(settings, r, mail=mail, counters=counters)
    print(f"fallback: {await worker.start()}", flush=True)
    try:
        await stop.wait()
    finally:
        await worker.stop()
