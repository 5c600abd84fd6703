"""The forward queue's dead letters: what the next hop kept refusing, listed and put back.

The worker (fallback.queues.forward) parks a record in its shard's
`fwdq:{fN}:dead` zset after forward_dead_letter_after of only-5xx answers.
The record keeps its bytes, envelope and last reply (`dead`, `parked`,
`refused_since`); this module is the operator's side of it: `scan` for
`fallback queue forward-dead`, `requeue` for `fallback queue forward-retry`,
which moves a letter back onto its stream in one single-slot script, so it
is never in both places and never in neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.errors import InputError

# KEYS: dead zset, record, stream; ARGV: member, recipient, message id.
# 1: back on the stream; 0: not parked (any more); -1: parked but its record is gone.
_REQUEUE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], 'dead', 'parked', 'refused_since')
redis.call('HSET', KEYS[2], 'runs', 0)
redis.call('XADD', KEYS[3], '*', 'a', ARGV[2], 'id', ARGV[3])
return 1
"""

_FIELDS = ("sender", "created", "attempts", "refused_since", "reply", "dead")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DeadLetter:
    """One parked record: one message for one recipient."""

    msg_id: str
    recipient: str
    sender: str
    parked: float          # when it was parked
    refused_since: float   # the first 5xx of the run that parked it
    created: float         # when it entered the forward queue
    attempts: int
    reply: str             # the next hop's last answer
    size: int              # bytes kept, exactly as received

    @property
    def shard(self) -> int:
        return keys.forward_shard(self.recipient)


def _letter(r: redis.Redis, member: str, parked: float) -> DeadLetter:
    msg_id, _, rcpt = member.partition("\t")
    rec = keys.forward_record(rcpt, msg_id)
    with r.pipeline(transaction=False) as pipe:
        pipe.hmget(rec, list(_FIELDS))
        pipe.hstrlen(rec, "raw")
        values, size = pipe.execute()
    f = dict(zip(_FIELDS, (_text(v) if v is not None else "" for v in values), strict=True))
    return DeadLetter(msg_id, rcpt, f["sender"], parked, float(f["refused_since"] or 0),
                      float(f["created"] or 0), int(f["attempts"] or 0),
                      f["dead"] or f["reply"] or "(record missing)", int(size or 0))


def scan(r: redis.Redis) -> list[DeadLetter]:
    """Every forward dead letter, oldest parked first."""
    out = []
    for n in range(keys.FORWARD_SHARDS):
        for member, score in r.zscan_iter(keys.forward_dead_n(n), count=1000):
            out.append(_letter(r, _text(member), float(score)))
    return sorted(out, key=lambda d: (d.parked, d.msg_id, d.recipient))


def find(r: redis.Redis, msg_id: str) -> list[DeadLetter]:
    """The dead letters of one message (one per recipient the next hop refused)."""
    found = [d for d in scan(r) if d.msg_id == msg_id.strip()]
    if not found:
        raise InputError(f"{msg_id}: no forward dead letter with this id "
                         "(fallback queue forward-dead lists them)")
    return found


def requeue(r: redis.Redis, letter: DeadLetter) -> bool:
    """Put one dead letter back on its stream for a fresh try; False if it was not parked
    any more (another operator, or a record that is gone: then nothing is left to send)."""
    n = letter.shard
    done = r.eval(_REQUEUE, 3, keys.forward_dead_n(n),
                  keys.forward_record(letter.recipient, letter.msg_id), keys.forward_stream_n(n),
                  f"{letter.msg_id}\t{letter.recipient}", letter.recipient, letter.msg_id)
    return int(done) == 1
