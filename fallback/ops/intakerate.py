"""The last hour of mail-log events by minute: the console's intake rate and replies by code.

The shared counters of /metrics (metrics.py) are totals since the start; an
operator in an outage asks "how much is coming in now, and what do we
answer?".  So each flush of a process's counters also adds its mail-event
counts to a per-minute hash (keys.metrics_minute_n: the same hash tag as the
flush's shard, so the flush stays one MULTI in one cluster slot) that
expires after KEEP seconds.  Reading an hour is one pipeline of
MINUTES x METRICS_SHARDS small HGETALLs: bounded, whatever the traffic.
Counts are filed under the minute of the flush, so a figure can lag by one
metrics_flush_interval.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from fallback import keys

MINUTES = 60
KEEP = MINUTES * 60 + 300   # seconds a minute's hash lives: the hour, and a little slack
# The receiver's events (and the webmail's refusals at its send limits): what "intake" means here.
INTAKE_EVENTS = ("received", "queued", "rejected", "deferred")
ACCEPTED_EVENTS = ("received", "queued")


def queue_minute(pipe: Any, shard: int, counts: Mapping[str, int], name: str,
                 now: float | None = None) -> None:
    """Add the counts of metric `name` (fields "<name>\\t<labels>") to this minute's hash."""
    minute = int((time.time() if now is None else now) // 60)
    key = keys.metrics_minute_n(shard, minute)
    prefix = name + "\t"
    wrote = False
    for f, n in counts.items():
        if f.startswith(prefix):
            pipe.hincrby(key, f[len(prefix):], n)
            wrote = True
    if wrote:
        pipe.expire(key, KEEP)


def _labels(text: str) -> dict[str, str]:
    return dict(p.partition("=")[::2] for p in text.split("\t") if p)


@dataclass
class Hour:
    """Per minute (oldest first, MINUTES of them) the accepted and refused deliveries, and the
    hour's replies by code."""

    first_minute: int
    accepted: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    replies: dict[str, int] = field(default_factory=dict)

    @property
    def accepted_total(self) -> int:
        return sum(self.accepted)

    @property
    def refused_total(self) -> int:
        return sum(self.refused)

    def per_five_minutes(self) -> list[tuple[int, int, int]]:
        """(first minute, accepted, refused) of each five minutes, oldest first."""
        return [(self.first_minute + i, sum(self.accepted[i:i + 5]), sum(self.refused[i:i + 5]))
                for i in range(0, len(self.accepted), 5)]


def last_hour(r: redis.Redis, now: float | None = None) -> Hour:
    """The last MINUTES minutes, this one included, summed over the shards."""
    this = int((time.time() if now is None else now) // 60)
    first = this - MINUTES + 1
    with r.pipeline(transaction=False) as pipe:
        for minute in range(first, this + 1):
            for n in range(keys.METRICS_SHARDS):
                pipe.hgetall(keys.metrics_minute_n(n, minute))
        replies = pipe.execute()
    hour = Hour(first)
    for i in range(MINUTES):
        accepted = refused = 0
        for shard in replies[i * keys.METRICS_SHARDS:(i + 1) * keys.METRICS_SHARDS]:
            for raw, value in shard.items():
                labels = _labels(raw.decode() if isinstance(raw, bytes) else str(raw))
                event, outcome, n = labels.get("event", ""), labels.get("outcome", ""), int(value)
                if event not in INTAKE_EVENTS:
                    continue
                if event in ACCEPTED_EVENTS:
                    accepted += n
                else:
                    refused += n
                code = outcome if outcome[:1].isdigit() else event
                hour.replies[code] = hour.replies.get(code, 0) + n
        hour.accepted.append(accepted)
        hour.refused.append(refused)
    hour.replies = dict(sorted(hour.replies.items()))
    return hour
