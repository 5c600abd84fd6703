"""The operator's hold on one sender's outbound mail: `fallback queue hold|release --user ADDRESS`.

When a webmail account is stolen, its queued mail must stop leaving through
the provider's smarthost at once, and nothing may be lost while the operator
looks.  While a sender is held (keys.outbound_hold, in the sender's slot):

* the outbound worker takes none of their messages: its take script sees the
  hold before it takes the lease or counts an attempt, and the entry goes
  back to the shard's retry zset to be looked at again after RECHECK seconds;
* mail they send from the webmail is filed in Sent and queued as usual, and
  held like the rest (the webmail says so);
* time spent held does not count towards the retry deadline: release adds it
  to each message's `held` field, which the worker adds to the deadline.

Release makes every held message due at once.  An attempt already under way
when the hold is placed finishes (it holds the message's lease).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.errors import InputError
from fallback.queues import outbound

RECHECK = 60.0  # seconds between two looks at a held message (release makes them due at once)

# KEYS: the hold, then the sender's delivery records.  ARGV: now, held since.
# Adds to each record the time it spent held, then lifts the hold: one step.
_RELEASE = """
local now, since = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local created = tonumber(redis.call('HGET', KEYS[i], 'created')) or now
    local held = now - math.max(since, created)
    if held > 0 then redis.call('HINCRBYFLOAT', KEYS[i], 'held', held) end
  end
end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True)
class Hold:
    user: str
    since: float
    actor: str
    reason: str
    queued: int          # the sender's messages with recipients not yet finished
    new: bool = True     # False: the sender was already held (the first hold is kept)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def get(r: redis.Redis, user: str) -> Hold | None:
    info: Any = r.hgetall(keys.outbound_hold(user))
    if not info:
        return None
    f = {_text(k): _text(v) for k, v in info.items()}
    return Hold(user, float(f.get("since") or 0), f.get("actor", ""), f.get("reason", ""),
                int(r.scard(keys.outbox(user))), new=False)


def hold(r: redis.Redis, user: str, actor: str, reason: str = "", now: float | None = None) -> Hold:
    """Stop the sender's outbound mail from leaving until `release`; a second hold changes nothing."""
    now = time.time() if now is None else now
    key = keys.outbound_hold(user)
    with r.pipeline(transaction=True) as pipe:
        pipe.hsetnx(key, "since", now)
        pipe.hsetnx(key, "actor", actor)
        pipe.hsetnx(key, "reason", reason)
        first = bool(pipe.execute()[0])
    r.sadd(keys.OUTBOUND_HELD, user)  # another slot: only the listing reads it
    found = get(r, user) or Hold(user, now, actor, reason, 0)
    return Hold(found.user, found.since, found.actor, found.reason, found.queued, new=first)


def release(r: redis.Redis, user: str, now: float | None = None) -> Hold:
    """Lift the hold; every held message is due at once, its held time added to its deadline."""
    found = get(r, user)
    if found is None:
        raise InputError(f"the outbound mail of {user} is not held")
    now = time.time() if now is None else now
    ids = sorted(_text(m) for m in r.smembers(keys.outbox(user)))
    r.eval(_RELEASE, 1 + len(ids), keys.outbound_hold(user),
           *[keys.outbound_record(user, i) for i in ids], now, found.since)
    r.srem(keys.OUTBOUND_HELD, user)
    if ids:
        # Waiting in the retry zset for the next look: due now (XX: never add what is not there).
        r.zadd(keys.outbound_retry_n(keys.outbound_shard(user)),
               {outbound.member(i, user): now for i in ids}, xx=True)
    return found


def held_senders(r: redis.Redis) -> list[Hold]:
    """Every sender on hold (the listing; a hold lifted meanwhile is left out)."""
    out = []
    for user in sorted(_text(u) for u in r.smembers(keys.OUTBOUND_HELD)):
        found = get(r, user)
        if found is not None:
            out.append(found)
    return out
