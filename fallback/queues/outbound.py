"""The outbound queue: messages sent from the webmail, waiting for the smarthost.

`submit` is the one way in: the Sent copy, the delivery record and the queue
entry are written in one MULTI/EXEC, so a message is either in Sent *and*
queued, or neither.  This module owns the queue's data: the delivery record
(one hash per sent message, one `rcpt:<addr>` field per recipient), where a
message waits (its stream shard, the shard's retry zset or dead-letter zset),
the back-off schedule, and the operator's view and actions (`fallback queue`).
The worker that drains it is fallback/queues/worker.py; the operator's hold on
one sender (`fallback queue hold --user`) is fallback/queues/hold.py.

Per-recipient states: queued -> (deferred ->)* delivered | failed.  A
recipient in a final state is never attempted again.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from fallback import ids, keys
from fallback.errors import InputError, NotFound
from fallback.mailbox import delivery, fields, headers
from fallback.mailbox.record import read_raw  # a message's bytes, any layout, maybe zstd (issue 17)
from fallback.queues import dsn
from fallback.queues.reliable import in_flight
from fallback.redisconn import is_cluster

QUEUED, DEFERRED, DELIVERED, FAILED = "queued", "deferred", "delivered", "failed"
FINAL = (DELIVERED, FAILED)
RCPT_PREFIX = "rcpt:"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- the bytes that are sent -------------------------------------------------------------

def ensure_headers(raw: bytes, sender: str, msg_id: str, when: float) -> bytes:
    """Prepend Message-ID and Date when the message lacks them (RFC 5322 3.6 wants both).

    Deterministic for one message (the id and the submit time), so a retry or
    the worker's belt-and-braces call produce the same bytes as the Sent copy.
    """
    names = headers.names(raw)
    eol = b"\r\n" if b"\r\n" in raw[:4096] or not raw else b"\n"
    add = b""
    if "message-id" not in names:
        domain = sender.rpartition("@")[2] or "localhost"
        add += f"Message-ID: <{msg_id}@{domain}>".encode("ascii", "replace") + eol
    if "date" not in names:
        add += f"Date: {email.utils.formatdate(when, localtime=False)}".encode("ascii") + eol
    return add + raw


def submit(r: redis.Redis, *, sender: str, mailstore: str, recipients: list[str], raw: bytes,
           msg_id: str, flags: tuple[str, ...] = (fields.SEEN,), not_before: float = 0.0,
           extra: dict[str, Any] | None = None) -> None:
    """Put a composed message in the sender's Sent folder and on the outbound queue.

    The Sent copy gets Message-ID and Date first when it lacks them, so what
    the sender keeps is byte for byte what the recipients get (before DKIM).
    `not_before` (undo send, fallback/queues/delayed.py): nothing is due before
    then, the entry waits in the shard's retry zset, and `extra` fields (what
    else waits) go into the record.
    """
    now = time.time()
    due = max(now, not_before)
    raw = ensure_headers(raw, sender, msg_id, now)
    record: dict[str, Any] = {
        "v": keys.SCHEMA_VERSION,
        "sender": sender,
        "mailstore": mailstore,
        "recipients": json.dumps(recipients),
        "created": now,
        **{rcpt_field(rcpt): json.dumps({"state": QUEUED, "attempts": 0, "reply": "",
                                         "next": due}) for rcpt in recipients},
    }
    if not_before:
        record.update(extra or {}, undo=due, notbefore=due)
    clustered = is_cluster(r)
    if not_before and clustered:  # another slot, written first for the reason below
        r.zadd(keys.outbound_retry_n(keys.outbound_shard(sender)), {member(msg_id, sender): due})
    elif clustered:
        # The stream shard is another slot.  The entry goes first: a worker that finds
        # no record yet looks again for SUBMIT_GRACE, so a crash in between leaves an
        # entry that is dropped, never a queued message without one.
        r.xadd(keys.outbound_stream(sender), {"a": sender, "id": msg_id})
    sent = delivery.Delivery(sender, mailstore, fields.SENT, flags, "sent")
    with r.pipeline(transaction=True) as pipe:
        delivery.queue_delivery(pipe, sent, msg_id, raw, headers.summarize(raw), int(now * 1000),
                             stats=not clustered)
        pipe.hset(keys.outbound_record(sender, msg_id), mapping=record)  # type: ignore[arg-type]
        pipe.sadd(keys.outbox(sender), msg_id)
        if not_before and not clustered:
            pipe.zadd(keys.outbound_retry_n(keys.outbound_shard(sender)), {member(msg_id, sender): due})
        elif not clustered:
            pipe.xadd(keys.outbound_stream(sender), {"a": sender, "id": msg_id})
        pipe.execute()
    if clustered:
        delivery.count_stored(r, [sent], len(raw))


SUBMIT_GRACE = 60.0  # seconds a queue entry may wait for its record (see submit)


def entry_age(entry_id: str) -> float:
    """Seconds since a stream entry was added (its id starts with the time in ms)."""
    try:
        return time.time() - int(entry_id.partition("-")[0]) / 1000
    except ValueError:
        return float("inf")


def recipient_status(r: redis.Redis, sender: str, msg_id: str) -> dict[str, dict[str, object]]:
    """Per-recipient delivery state of one sent message, for the webmail's Sent view.

    Each value: state (queued, deferred, delivered, failed), attempts, reply
    (the last server reply), next (epoch seconds of the next attempt), and
    once attempted, last (epoch seconds of the last attempt).
    """
    fields = r.hgetall(keys.outbound_record(sender, msg_id))
    out: dict[str, dict[str, object]] = {}
    for key, value in fields.items():
        name = _text(key)
        if name.startswith(RCPT_PREFIX):
            out[name[len(RCPT_PREFIX):]] = json.loads(value)
    if out and is_held(r, sender):
        for st in out.values():
            if st.get("state") not in FINAL:
                st["held"] = True  # not sent until the operator releases the sender
    return out


def is_held(r: redis.Redis, sender: str) -> bool:
    """The operator holds this sender's outbound mail (fallback/queues/hold.py)."""
    return bool(r.exists(keys.outbound_hold(sender)))


# --- the delivery record -----------------------------------------------------------------

def rcpt_field(address: str) -> str:
    return RCPT_PREFIX + address


@dataclass
class Record:
    """One sent message's delivery record, parsed."""

    sender: str
    msg_id: str
    created: float
    mailstore: str
    rcpts: dict[str, dict[str, Any]]
    runs: int = 0
    dead: str = ""
    held: float = 0.0  # seconds spent on hold: they do not count towards the retry deadline
    extra: dict[str, str] = field(default_factory=dict)

    def pending(self) -> list[str]:
        return [a for a, st in self.rcpts.items() if st.get("state") not in FINAL]

    def next_due(self) -> float | None:
        times = [float(self.rcpts[a].get("next") or 0) for a in self.pending()]
        return min(times) if times else None

    def attempts(self) -> int:
        return max((int(st.get("attempts", 0)) for st in self.rcpts.values()), default=0)

    def last_reply(self) -> str:
        latest = max(self.rcpts.values(), key=lambda st: float(st.get("last") or 0), default={})
        return str(latest.get("reply") or "")


def parse_record(msg_id: str, fields: dict[Any, Any]) -> Record:
    """Raises ValueError/KeyError on a damaged record (the worker then treats it as poison)."""
    f = {_text(k): v for k, v in fields.items()}
    rcpts: dict[str, dict[str, Any]] = {}
    for address in json.loads(f["recipients"]):
        value = f.get(rcpt_field(address))
        rcpts[address] = json.loads(value) if value is not None else {
            "state": QUEUED, "attempts": 0, "reply": "", "next": 0}
    return Record(
        sender=_text(f["sender"]), msg_id=msg_id, created=float(f["created"]),
        mailstore=_text(f.get("mailstore", b"default")), rcpts=rcpts,
        runs=int(f.get("runs", 0)), dead=_text(f.get("dead", b"")), held=float(f.get("held") or 0),
        extra={k: _text(v) for k, v in f.items()
               if k in ("done", "parked", "deleted") and v is not None},
    )


def backoff(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before attempt number attempts+1: base * 2^(attempts-1), capped, with +-25% jitter.

    The jitter spreads the retries of many messages deferred at once (a
    smarthost that was down) so they do not all come back in the same second.
    """
    delay = min(base * 2 ** max(attempts - 1, 0), max(cap, base))
    return delay * (rng or random).uniform(0.75, 1.25)


def queue_outcome(pipe: Any, rec: Record, updates: dict[str, dict[str, Any]], now: float,
                  notice: tuple[str, bytes] | None, stats: bool = True) -> bool:
    """Queue the record update of one attempt on a (sync or async) MULTI pipeline.

    The failure notice (DSN) goes into the sender's INBOX in the same
    transaction as the recipients' failed state: one cannot happen without the
    other.  Returns whether the message is finished (every recipient final).
    """
    key = keys.outbound_record(rec.sender, rec.msg_id)
    rec.rcpts.update(updates)
    if updates:
        pipe.hset(key, mapping={rcpt_field(a): json.dumps(st) for a, st in updates.items()})
    pipe.hset(key, "runs", 0)
    finished = not rec.pending()
    if finished:
        pipe.hset(key, "done", now)
        pipe.srem(keys.outbox(rec.sender), rec.msg_id)
    if notice is not None:
        notice_id, raw = notice
        delivery.queue_delivery(pipe, delivery.Delivery(rec.sender, rec.mailstore, fields.INBOX),
                             notice_id, raw, headers.summarize(raw), int(now * 1000), stats)
    return finished


def member(msg_id: str, sender: str) -> str:
    """How a message is named in a shard's retry and dead-letter zsets."""
    return f"{msg_id}\t{sender}"


def split_member(value: bytes | str) -> tuple[str, str]:
    msg_id, _, sender = _text(value).partition("\t")
    return msg_id, sender


# --- the operator's view: `fallback queue` -----------------------------------------------

@dataclass
class QueueItem:
    msg_id: str
    sender: str
    where: str                 # waiting | in flight | retry | dead | held
    shard: int
    record: Record | None      # None: the record is gone or damaged
    error: str = ""
    entry_ids: list[str] = field(default_factory=list)


def ensure_groups(r: redis.Redis) -> None:
    """The consumer group on every shard (created at the start: entries queued before count)."""
    for n in range(keys.OUTBOUND_SHARDS):
        try:
            r.xgroup_create(keys.outbound_stream_n(n), keys.OUTBOUND_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def _stream_items(r: redis.Redis, n: int) -> Iterable[QueueItem]:
    stream = keys.outbound_stream_n(n)
    inflight = in_flight(r, stream, keys.OUTBOUND_GROUP)
    entries: Any = r.xrange(stream)
    for entry_id, entry in entries:
        eid = _text(entry_id)
        f = {_text(k): _text(v) for k, v in entry.items()}
        yield QueueItem(f.get("id", ""), f.get("a", ""), "in flight" if eid in inflight else "waiting",
                        n, None, entry_ids=[eid])


def scan(r: redis.Redis, only: str | None = None) -> list[QueueItem]:
    """Every message the queue holds, from every shard, with its record (or None)."""
    items: dict[tuple[str, str], QueueItem] = {}
    for n in range(keys.OUTBOUND_SHARDS):
        found: list[QueueItem] = list(_stream_items(r, n))
        for where, key in (("retry", keys.outbound_retry_n(n)), ("dead", keys.outbound_dead_n(n))):
            members: Any = r.zrange(key, 0, -1)
            for m in members:
                msg_id, sender = split_member(m)
                found.append(QueueItem(msg_id, sender, where, n, None))
        for item in found:
            if only is not None and item.msg_id != only:
                continue
            seen = items.get((item.msg_id, item.sender))
            if seen is None:
                items[(item.msg_id, item.sender)] = item
            else:
                seen.entry_ids += item.entry_ids
                if item.where in ("dead", "in flight"):
                    seen.where = item.where
    out = list(items.values())
    senders = sorted({item.sender for item in out})
    with r.pipeline(transaction=False) as pipe:
        for sender in senders:
            pipe.exists(keys.outbound_hold(sender))
        held = {s for s, n in zip(senders, pipe.execute(), strict=True) if n}
    with r.pipeline(transaction=False) as pipe:
        for item in out:
            if item.sender in held and item.where in ("waiting", "retry"):
                item.where = "held"
            pipe.hgetall(keys.outbound_record(item.sender, item.msg_id))
        for item, fields in zip(out, pipe.execute(), strict=True):
            if not fields:
                item.error = "no delivery record"
                continue
            try:
                item.record = parse_record(item.msg_id, fields)
            except (ValueError, KeyError, TypeError) as exc:
                item.error = f"damaged delivery record: {type(exc).__name__}: {exc}"
    out.sort(key=lambda i: i.msg_id)
    return out


def find(r: redis.Redis, msg_id: str) -> QueueItem:
    # Looked up before the id is judged: a parked malformed entry is named by its stream id.
    found = scan(r, only=msg_id) if msg_id else []
    if not found and not ids.is_id(msg_id):
        raise InputError(f"{msg_id!r} is not a message id (26 characters, as `fallback queue list` shows)")
    if not found:
        raise NotFound(f"message {msg_id} is not in the outbound queue")
    return found[0]


_REQUEUE = """
local n = 0
for i = 1, 2 do
  n = n + redis.call('ZREM', KEYS[i], ARGV[1])
end
if n > 0 then
  redis.call('XADD', KEYS[3], '*', 'a', ARGV[2], 'id', ARGV[3])
end
return n
"""


def retry_now(r: redis.Redis, msg_id: str) -> QueueItem:
    """Make every unfinished recipient due now; a dead letter goes back on the queue."""
    item = find(r, msg_id)
    if item.record is None:
        raise InputError(f"message {msg_id} cannot be retried: {item.error}; delete it instead")
    if is_held(r, item.sender):
        raise InputError(f"message {msg_id} is held with all mail from {item.sender}; "
                         f"`fallback queue release --user {item.sender}` lets it go")
    now = time.time()
    rec = item.record
    updates = {a: {**rec.rcpts[a], "next": now} for a in rec.pending()}
    key = keys.outbound_record(item.sender, msg_id)
    with r.pipeline(transaction=True) as pipe:
        if updates:
            pipe.hset(key, mapping={rcpt_field(a): json.dumps(st) for a, st in updates.items()})
        pipe.hset(key, "runs", 0)
        pipe.hdel(key, "dead", "parked")
        pipe.execute()
    # Retry and dead zsets and the stream share the shard's slot: one atomic move.
    r.eval(_REQUEUE, 3, keys.outbound_retry_n(item.shard), keys.outbound_dead_n(item.shard),
           keys.outbound_stream_n(item.shard), member(msg_id, item.sender), item.sender, msg_id)
    return item


class Busy(InputError):
    """The message is being delivered right now."""


def delete(r: redis.Redis, msg_id: str, hostname: str, lease_ttl: float) -> QueueItem:
    """Take a message off the queue: its unfinished recipients fail, the sender gets a notice."""
    item = find(r, msg_id)
    ensure_groups(r)
    lease = keys.outbound_lease(item.sender, msg_id)
    token = f"operator:{ids.new_id()}"
    if not r.set(lease, token, nx=True, px=int(lease_ttl * 1000)):
        raise Busy(f"message {msg_id} is being delivered right now; try again in a moment")
    try:
        now = time.time()
        if item.record is not None:
            rec = item.record
            reply = "deleted from the queue by the operator"
            updates = {a: {**rec.rcpts[a], "state": FAILED, "reply": reply, "next": 0,
                           "status": "5.0.0"} for a in rec.pending()}
            notice = None
            rec.rcpts.update(updates)
            if updates:
                raw: Any = read_raw(r, keys.message(item.sender, msg_id)) or b""
                notice = (ids.new_id(), dsn.build(hostname, rec, list(updates), bytes(raw), None))
            clustered = is_cluster(r)
            with r.pipeline(transaction=True) as pipe:
                queue_outcome(pipe, rec, updates, now, notice, stats=not clustered)
                pipe.hset(keys.outbound_record(item.sender, msg_id), "deleted", now)
                pipe.execute()
            if notice is not None and clustered:
                delivery.count_stored(r, [delivery.Delivery(rec.sender, rec.mailstore)], len(notice[1]))
        else:
            r.delete(keys.outbound_record(item.sender, msg_id))
        n = item.shard
        with r.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.outbound_retry_n(n), member(msg_id, item.sender))
            pipe.zrem(keys.outbound_dead_n(n), member(msg_id, item.sender))
            if item.entry_ids:
                pipe.xack(keys.outbound_stream_n(n), keys.OUTBOUND_GROUP, *item.entry_ids)
                pipe.xdel(keys.outbound_stream_n(n), *item.entry_ids)
            pipe.execute()
    finally:
        if r.get(lease) == token.encode():
            r.delete(lease)
    return item
