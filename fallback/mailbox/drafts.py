"""Drafts: the webmail's unsent messages, kept in the mailbox's Drafts folder.

A draft is an ordinary message record (fields.py) in fields.DRAFTS with kind
"draft" and the flags \\Seen \\Draft; its `raw` is the MIME a send would
produce (fallback.intake.submission.build), so reconcile appends to the main
store's \\Drafts folder exactly what the user saw.  What the bytes cannot hold
(Bcc, the address fields exactly as typed, which message it replies to) is
kept beside them as JSON in fields.DRAFT_FORM.  Later saves of the same
compose session overwrite the record in place (one draft per session); the
mailbox's usage (keys.info) follows every write, counted like any other
webmail write and never refused.  Every key is the mailbox's own.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from fallback import keys
from fallback.mailbox import changes, delivery, headers, record
from fallback.mailbox import fields as F
from fallback.redisconn import is_cluster

KIND = "draft"
FLAGS = (F.SEEN, F.DRAFT)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


class NotADraft(LookupError):
    """The id names no draft of this mailbox (sent, deleted, another kind, another user's)."""


def save(r: redis.Redis, address: str, mailstore: str, draft_id: str, raw: bytes,
         form: dict[str, str]) -> None:
    """Create the draft, or overwrite it in place; NotADraft when the id is some other message."""
    key = keys.message(address, draft_id)
    meta: dict[str, Any] = {**headers.summarize(raw), F.DRAFT_FORM: json.dumps(form)}
    clustered = is_cluster(r)
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                kind, size, ts = pipe.hmget(key, (F.KIND, F.SIZE, F.TS))
                # Every record has a time; a received one has no kind field (record.DEFAULTS).
                if ts is not None and _text(kind or b"received") != KIND:
                    pipe.reset()
                    raise NotADraft(draft_id)
                now_ms = int(time.time() * 1000)
                pipe.multi()
                if ts is None:
                    d = delivery.Delivery(address, mailstore, F.DRAFTS, FLAGS, KIND)
                    delivery.queue_delivery(pipe, d, draft_id, raw, meta, now_ms, stats=not clustered)
                    grown, added = len(raw), 1
                else:
                    grown, added = len(raw) - int(size or 0), 0
                    # Layout 3 (record.py): the bytes maybe zstd in their own key, an older
                    # layout's `raw` field dropped, the display values packed.
                    record.queue_write(pipe, key, record.store(raw, meta), {F.TS: now_ms}, replacing=True)
                    pipe.zadd(keys.folder(address, F.DRAFTS), {draft_id: now_ms})  # newest save first
                    pipe.sadd(keys.pending(address), draft_id)
                    pipe.hincrby(keys.info(address), "bytes", grown)
                    if not clustered:
                        pipe.hincrby(keys.stats_shard(address), f"{mailstore}\tbytes", grown)
                    changes.queue_touch(pipe, address)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    if clustered:  # the stats shard is another slot there: best effort, as delivery.count_stored
        with r.pipeline(transaction=False) as p:
            p.hincrby(keys.stats_shard(address), f"{mailstore}\tmessages", added)
            p.hincrby(keys.stats_shard(address), f"{mailstore}\tbytes", grown)
            p.execute()


def load(r: redis.Redis, address: str, draft_id: str) -> tuple[dict[str, str], bytes]:
    """(form as typed, raw) of one of this mailbox's drafts; NotADraft otherwise."""
    key = keys.message(address, draft_id)
    pipe = r.pipeline(transaction=False)
    pipe.hmget(key, (F.KIND, F.DRAFT_FORM))
    record.queue_raw(pipe, key)
    (kind, form), stored = pipe.execute()
    raw = record.raw_of(stored)
    if kind is None or _text(kind) != KIND or raw is None:
        raise NotADraft(draft_id)
    try:
        values = json.loads(_text(form)) if form else {}
    except ValueError:
        values = {}  # a damaged form field: the bytes still hold To, Cc, the subject and body
    return ({str(k): str(v) for k, v in values.items()} if isinstance(values, dict) else {},
            raw)


def delete(r: redis.Redis, address: str, draft_id: str) -> bool:
    """Delete a draft for good (it was sent); False when there was none."""
    key = keys.message(address, draft_id)
    clustered = is_cluster(r)
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                kind, size, rstate = pipe.hmget(key, (F.KIND, F.SIZE, F.RSTATE))
                if kind is None or _text(kind) != KIND:
                    pipe.reset()
                    return False
                store_name = _text(pipe.hget(keys.info(address), "mailstore")) or "default"
                pipe.multi()
                record.queue_delete(pipe, key)
                pipe.zrem(keys.folder(address, F.DRAFTS), draft_id)
                pipe.srem(keys.unseen(address), draft_id)
                pipe.srem(keys.pending(address), draft_id)
                pipe.hincrby(keys.info(address), "messages", -1)
                pipe.hincrby(keys.info(address), "bytes", -int(size or 0))
                # Reconcile's state counters (reconcile/state.py): pending is what is left.
                moved = _text(rstate) if rstate and _text(rstate) != F.PENDING else None
                if not clustered:
                    pipe.hincrby(keys.stats_shard(address), f"{store_name}\tmessages", -1)
                    pipe.hincrby(keys.stats_shard(address), f"{store_name}\tbytes", -int(size or 0))
                    if moved:
                        pipe.hincrby(keys.reconcile_counts_shard(address), f"{store_name}\t{moved}", -1)
                changes.queue_touch(pipe, address)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    if clustered:
        with r.pipeline(transaction=False) as p:
            p.hincrby(keys.stats_shard(address), f"{store_name}\tmessages", -1)
            p.hincrby(keys.stats_shard(address), f"{store_name}\tbytes", -int(size or 0))
            if moved:
                p.hincrby(keys.reconcile_counts_shard(address), f"{store_name}\t{moved}", -1)
            p.execute()
    return True
