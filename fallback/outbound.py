"""The outbound queue: messages sent from the webmail, waiting for the smarthost.

`submit` is the one way in: the Sent copy, the delivery record and the queue
entry are written in one MULTI/EXEC, so a message is either in Sent *and*
queued, or neither.  The worker that drains the queue lives beside it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from fallback import keys, store

RETRY_BASE = 60.0


def submit(r: redis.Redis, *, sender: str, mailstore: str, recipients: list[str], raw: bytes,
           msg_id: str, flags: tuple[str, ...] = (store.SEEN,)) -> None:
    """Put a composed message in the sender's Sent folder and on the outbound queue."""
    now = time.time()
    record: dict[str, Any] = {
        "v": keys.SCHEMA_VERSION,
        "sender": sender,
        "recipients": json.dumps(recipients),
        "created": now,
        **{f"rcpt:{rcpt}": json.dumps({"state": "queued", "attempts": 0, "reply": "",
                                        "next": now}) for rcpt in recipients},
    }
    with r.pipeline(transaction=True) as pipe:
        store.queue_delivery(pipe, store.Delivery(sender, mailstore, store.SENT, flags, "sent"),
                             msg_id, raw, store.summarize(raw), int(now * 1000))
        pipe.hset(keys.outbound_record(sender, msg_id), mapping=record)  # type: ignore[arg-type]
        pipe.sadd(keys.outbox(sender), msg_id)
        pipe.xadd(keys.outbound_stream(sender), {"a": sender, "id": msg_id})
        pipe.execute()


def recipient_status(r: redis.Redis, sender: str, msg_id: str) -> dict[str, dict[str, object]]:
    """Per-recipient delivery state of one sent message, for the webmail's Sent view."""
    fields = r.hgetall(keys.outbound_record(sender, msg_id))
    out: dict[str, dict[str, object]] = {}
    for key, value in fields.items():
        name = key.decode() if isinstance(key, bytes) else key
        if name.startswith("rcpt:"):
            out[name[5:]] = json.loads(value)
    return out
