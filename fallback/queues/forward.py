"""The forward queue: mail for users whose mailstore is healthy, handed on to the main system.

Intake (the receiver, in the same atomic write as any mailbox copies of the
message, see `accept_async`; the webmail, one recipient at a time, see
`enqueue`), for each recipient routing.decide sends here:

* a record per recipient, `fwdq:{fN}:r:<rcpt>:<id>` (its shard's slot, so the
  record, its stream entry and its retry member change in one transaction
  even on a Redis Cluster): the exact raw bytes, the original envelope
  sender, created, attempts, the next hop's last reply;
* an entry `{a: rcpt, id: <id>}` in the shard stream `fwdq:{fN}`.

The worker (`Forwarder`) runs the same reliable-queue loop as the outbound
one (fallback.queues.reliable.StreamWorker):

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
  forward_retry_max_interval.  It never bounces and never drops: the
  recipient is a real user of the main system.  A 5xx is retried too and
  logged as an alert (the main system refusing its own user is an operator's
  problem); mail older than forward_alert_age is alerted once and `fallback
  check` warns on the queue's age.  A record whose attempts keep dying
  (max_crashes) is put back at the longest interval instead of crash-looping
  the workers.
* Parking: a record the next hop has answered only with 5xx for
  forward_dead_letter_after (counted from the first 5xx of the run; a 4xx or
  a connection failure ends the run) is parked in the shard's dead-letter
  zset `fwdq:{fN}:dead` with its bytes and last reply, so it stops costing
  attempts; `fallback queue forward-retry` (fallback.queues.forward_dead)
  puts it back.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.config import Settings
from fallback.mailbox import delivery
from fallback.mailbox.compression import Codec
from fallback.mailbox.durability import ReplicaAcks
from fallback.maillog import MailLog
from fallback.queues import reliable
from fallback.queues.nexthop import NextHop
from fallback.queues.outbound import backoff
from fallback.queues.smarthost import Reply
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

GROUP = keys.FORWARD_GROUP


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


def queue_dead(pipe: Any, recipient: str, msg_id: str, at: float) -> None:
    """Park a record in its shard's dead-letter zset (member "<id>\\t<rcpt>", score = when)."""
    pipe.zadd(keys.forward_dead_n(keys.forward_shard(recipient)), {f"{msg_id}\t{recipient}": at})


def queue_forward(pipe: Any, recipient: str, msg_id: str, raw: bytes, sender: str, now: float) -> None:
    """Queue one recipient's forward record and stream entry on a (sync or async) MULTI pipeline."""
    pipe.hset(keys.forward_record(recipient, msg_id), mapping={
        "v": keys.SCHEMA_VERSION, "raw": raw, "sender": sender, "rcpt": recipient,
        "created": now, "attempts": 0})
    pipe.xadd(keys.forward_stream(recipient), {"a": recipient, "id": msg_id})


def enqueue(r: redis.Redis, recipients: list[str], msg_id: str, raw: bytes, sender: str) -> None:
    """The webmail's write: each recipient's record and stream entry in one MULTI/EXEC.

    Record and entry share the shard's hash tag, so each transaction stays in
    one slot on a Redis Cluster too; a second recipient is a second
    transaction.  Raises on the first failure (the recipients before it are queued).
    """
    now = time.time()
    for rcpt in recipients:
        with r.pipeline(transaction=True) as pipe:
            queue_forward(pipe, rcpt, msg_id, raw, sender, now)
            pipe.execute()


# The intake's write of one forward: the record and its stream entry (one slot).  KEYS: the
# dedupe guard (only with a guard TTL in ARGV[1]), record, stream; ARGV: guard TTL or '',
# id, recipient, sender, raw, created, schema version.  Returns 0 if the guard was there.
_FORWARD_LUA = """
local k = 0
if ARGV[1] ~= '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
  k = 1
end
redis.call('HSET', KEYS[k + 1], 'v', ARGV[7], 'raw', ARGV[5], 'sender', ARGV[4], 'rcpt', ARGV[3],
           'created', ARGV[6], 'attempts', 0)
redis.call('XADD', KEYS[k + 2], '*', 'a', ARGV[3], 'id', ARGV[2])
return 1
"""


async def accept_async(r: aioredis.Redis, copies: list[tuple[list[delivery.Delivery], bytes]],
                       forwards: list[str], msg_id: str, raw: bytes, sender: str,
                       replicas: ReplicaAcks | None = None, digest: str | None = None,
                       how: Codec | None = None) -> None:
    """The receiver's write when some recipients are forwarded: the mailbox copies (each its
    own bytes, as delivery.deliver_copies_async takes them: a mailbox reached through an
    alias or a subaddress names it) and the forward records of `raw` (the copy that names
    nobody but a single recipient, so a Bcc stays hidden) with their stream entries, as one
    write (delivery.run_atomic: one MULTI/EXEC on one Redis).

    On a Redis Cluster the parts sit in different slots and are written one
    per slot; each is guarded by `digest` (keys.dedupe), so the sender's
    retry after a partial failure completes the message without doubles.
    """
    now = time.time()
    clustered = is_cluster(r)
    units = (sum(len(delivery.slot_groups(g)) for g, _ in copies if g) + len(forwards)
             if clustered else 1)
    guard = digest if units > 1 else None
    calls, parts = delivery.copy_calls(copies, msg_id, int(now * 1000), clustered, guard, how)
    for rcpt in forwards:
        keys_ = [keys.forward_record(rcpt, msg_id), keys.forward_stream(rcpt)]
        if guard is not None:
            keys_.insert(0, keys.forward_dedupe(rcpt, guard))
        calls.append((_FORWARD_LUA, keys_, [str(keys.DEDUPE_TTL_MS) if guard else "", msg_id, rcpt,
                                            sender, raw, repr(now), keys.SCHEMA_VERSION]))
    results = await delivery.run_atomic(r, calls, replicas)
    # The mailbox calls come first; 0 means already stored (a retry), so not counted again.
    await delivery.count_copies_async(r, parts, results, clustered)


@dataclass(frozen=True)
class Entry:
    stream: str
    entry_id: str
    recipient: str
    msg_id: str


class Forwarder(reliable.StreamWorker):
    """One process's forward loop; start() launches tasks, stop() ends them."""

    label = "forward"

    def __init__(self, settings: Settings, r: aioredis.Redis, hostname: str | None = None,
                 mail: MailLog | None = None, counters: reliable.Flushing | None = None) -> None:
        self.s = settings
        self.hostname = hostname or settings.hostname or socket.gethostname()
        super().__init__(
            r, group=GROUP,
            streams=[keys.forward_stream_n(n) for n in range(keys.FORWARD_SHARDS)],
            retry=[(keys.forward_retry_n(n), keys.forward_stream_n(n))
                   for n in range(keys.FORWARD_SHARDS)],
            consumer=reliable.consumer_name(self.hostname),
            concurrency=settings.worker_concurrency, claim_timeout=settings.claim_timeout,
            retry_base=settings.forward_retry_base, counters=counters)
        self.hop = NextHop.from_settings(settings, self.hostname)
        self.mail = mail or MailLog()  # a counting one (and its counters) from the owner

    async def start(self) -> str:
        await self.start_loops()
        return (f"forward worker {self.consumer} -> {self.hop.name}, "
                f"{self.s.worker_concurrency} at a time")

    # --- one record ----------------------------------------------------------------------

    async def handle(self, stream: str, entry_id: str, fields: dict[Any, Any]) -> None:
        f = {reliable.text(k): reliable.text(v) for k, v in (fields or {}).items()}
        e = Entry(stream, entry_id, f.get("a", ""), f.get("id", ""))
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
        await self.while_leased(e.stream, e.entry_id, lease, token, self._attempt(e))

    async def _attempt(self, e: Entry) -> None:
        rec = keys.forward_record(e.recipient, e.msg_id)
        fields: Any = await self.r.hgetall(rec)
        if not fields:
            await self._finish(e, None)  # already delivered (a duplicate entry)
            return
        f = {reliable.text(k): v for k, v in fields.items()}
        if f.get("parked"):
            await self._finish(e, None)  # a stale entry of a dead letter: it waits for an operator
            return
        sender, raw = reliable.text(f.get("sender", b"")), bytes(f.get("raw", b""))
        created = float(reliable.text(f.get("created", "0")))
        attempts = int(reliable.text(f.get("attempts", "0")))
        runs = int(await self.r.hincrby(rec, "runs", 1))
        if runs > self.s.max_crashes:
            # Attempts that never finished (crashes): wait the longest interval, not a crash loop.
            log.error("forward: %s for %s was taken up %d times without finishing; next try in %gs",
                      e.msg_id, e.recipient, runs - 1, self.s.forward_retry_max_interval)
            self.mail.alert(e.msg_id, e.recipient, route="forward", reason=f"{runs - 1} unfinished attempts")
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
            self.mail.forwarded(e.msg_id, sender, e.recipient, reply=reply.text, peer=self.hop.name,
                                attempts=attempts + 1)
            return
        await self._defer(e, rec, sender, created, attempts + 1, reply, now, f)

    async def _defer(self, e: Entry, rec: str, sender: str, created: float, attempts: int, reply: Reply,
                     now: float, f: dict[str, Any]) -> None:
        # The run of 5xx answers starts at the first one; anything else (4xx, no connection) ends it.
        since = float(reliable.text(f.get("refused_since") or b"0")) or now
        if reply.permanent and now - since >= self.s.forward_dead_letter_after:
            await self._park(e, rec, sender, attempts, reply, now, since)
            return
        delay = backoff(attempts, self.s.forward_retry_base, self.s.forward_retry_max_interval)
        age = now - created
        alert_age = age >= self.s.forward_alert_age and not f.get("alerted")
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(rec, mapping={"attempts": attempts, "reply": reply.text, "code": reply.code,
                                    "last": now, "next": now + delay, "runs": 0,
                                    **({"alerted": now} if alert_age else {}),
                                    **({"refused_since": since} if reply.permanent else {})})
            if not reply.permanent:
                pipe.hdel(rec, "refused_since")
            queue_retry(pipe, e.recipient, e.msg_id, now + delay)
            queue_refused(pipe, e.recipient, e.msg_id, now if reply.permanent else None)
            pipe.xack(e.stream, GROUP, e.entry_id)
            pipe.xdel(e.stream, e.entry_id)
            await pipe.execute()
        self.mail.deferred(e.msg_id, sender, e.recipient, route="forward", reply=reply.text,
                           peer=self.hop.name, attempts=attempts, retry_in=round(delay, 1),
                           reason="temporary failure, retried")
        if reply.permanent:
            # Never bounced: the recipient is a provisioned user, so the main system refusing
            # them is a configuration problem for the operator, and the mail waits for the fix.
            log.error("forward: next hop %s refused %s for %s permanently (%s); kept and retried",
                      self.hop.name, e.msg_id, e.recipient, reply.text)
            self.mail.alert(e.msg_id, e.recipient, route="forward", reply=reply.text,
                            reason="permanent refusal, kept and retried")
        if alert_age:
            log.warning("forward: %s for %s has waited %.0fs (over forward_alert_age); still trying",
                        e.msg_id, e.recipient, age)
            self.mail.alert(e.msg_id, e.recipient, route="forward", age=round(age),
                            reason="waiting longer than forward_alert_age")

    async def _park(self, e: Entry, rec: str, sender: str, attempts: int, reply: Reply, now: float,
                    since: float) -> None:
        """Only 5xx for forward_dead_letter_after: kept (bytes and all) in the dead-letter set,
        out of the retry loop, until an operator puts it back (fallback queue forward-retry)."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(rec, mapping={"attempts": attempts, "reply": reply.text, "code": reply.code,
                                    "last": now, "runs": 0, "refused_since": since,
                                    "dead": reply.text, "parked": now})
            pipe.hdel(rec, "next")
            queue_dead(pipe, e.recipient, e.msg_id, now)
            queue_refused(pipe, e.recipient, e.msg_id, None)
            pipe.xack(e.stream, GROUP, e.entry_id)
            pipe.xdel(e.stream, e.entry_id)
            await pipe.execute()
        refused_for = round(now - since)
        log.error("forward: next hop %s refused %s for %s with 5xx for %ds (%s); parked as a dead letter",
                  self.hop.name, e.msg_id, e.recipient, refused_for, reply.text)
        self.mail.failed(e.msg_id, sender, e.recipient, stage="forward", outcome="dead-letter",
                         reason=f"parked as dead letter: next hop refused with 5xx for {refused_for}s: "
                                f"{reply.text}")

    async def _finish(self, e: Entry, retry_at: float | None) -> None:
        """Done with an entry: acknowledged and deleted; if it must come back, scheduled."""
        async with self.r.pipeline(transaction=True) as pipe:
            if retry_at is not None:
                queue_retry(pipe, e.recipient, e.msg_id, retry_at)
            pipe.xack(e.stream, GROUP, e.entry_id)
            pipe.xdel(e.stream, e.entry_id)
            await pipe.execute()


@dataclass
class ForwardComponent:
    """The forward worker as a service component; without forward_to, mail waits in the queue."""

    settings: Settings
    r: aioredis.Redis
    name: str = "forward"
    forwarder: Forwarder | None = None
    # What it logs is counted for /metrics when the owner gives a counting log and its counters.
    mail: MailLog | None = None
    counters: reliable.Flushing | None = None

    async def start(self) -> str:
        if not self.settings.forward_to:
            return "forward worker: off (no --forward-to); mail for users not failed over waits in the queue"
        self.forwarder = Forwarder(self.settings, self.r, mail=self.mail, counters=self.counters)
        return await self.forwarder.start()

    async def stop(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.stop()
