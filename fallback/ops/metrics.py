"""Counters shared by every process, and the Prometheus text that /metrics serves.

Each process counts in memory (a `Counters` object, made and passed in by its
owner) and every `metrics_flush_interval` seconds adds what it counted to one
of the sharded Redis hashes `metrics:{c<n>}` with HINCRBY; /metrics sums the
shards.  Counting costs no Redis round trip, a flush is one pipeline, and any
number of receivers and webmail workers add up to one figure.  A process
killed between two flushes loses at most that interval's counts: these
numbers are for watching the service, not for billing.

`MailCounters` turns mail-log events into counts (fallback.maillog.MailLog
takes one as its sink), so a component counts what it logs without knowing
about metrics.  Gauges (queues, Redis memory, stored messages) are read from
Redis when /metrics is asked, from figures that are cheap to read: no scan
of the mailboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fallback import keys
from fallback.mailbox.store import mailstore_stats
from fallback.ops import failover, health

log = logging.getLogger(__name__)

MAIL_EVENTS = "mail_events"        # labels: event, outcome (reply code for the receiver's events)
WEBMAIL_LOGINS = "webmail_logins"  # labels: result
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.:@+-]")
_WORD = re.compile(r"[a-z][a-z-]{0,30}")


def _field(name: str, labels: Mapping[str, str]) -> str:
    parts = [name] + [f"{k}={_LABEL_VALUE.sub('_', str(v))[:64]}" for k, v in sorted(labels.items())]
    return "\t".join(parts)


def _parse_field(field: str) -> tuple[str, dict[str, str]]:
    name, *pairs = field.split("\t")
    return name, dict(p.partition("=")[::2] for p in pairs)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Counters:
    """One process's counts since its last flush; thread-safe (webmail threads share one)."""

    def __init__(self, interval: float = 5.0, shard: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # A random shard per process: flushes of many processes spread over the hashes.
        self.shard = secrets.randbelow(keys.METRICS_SHARDS) if shard is None else shard
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._flushed_at = clock()

    def add(self, name: str, n: int = 1, **labels: str) -> None:
        field = _field(name, labels)
        with self._lock:
            self._counts[field] = self._counts.get(field, 0) + n

    def due(self) -> bool:
        return self.clock() - self._flushed_at >= self.interval

    def _take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = self._counts, {}
            self._flushed_at = self.clock()
        return counts

    def _give_back(self, counts: dict[str, int]) -> None:
        with self._lock:
            for field, n in counts.items():
                self._counts[field] = self._counts.get(field, 0) + n

    def flush(self, r: redis.Redis) -> None:
        """Add the counts to Redis; on failure they stay here for the next flush."""
        counts = self._take()
        if not counts:
            return
        try:
            with r.pipeline(transaction=True) as pipe:
                for field, n in counts.items():
                    pipe.hincrby(keys.metrics_shard_n(self.shard), field, n)
                pipe.execute()
        except BaseException:
            self._give_back(counts)
            raise

    async def flush_async(self, r: aioredis.Redis) -> None:
        counts = self._take()
        if not counts:
            return
        try:
            async with r.pipeline(transaction=True) as pipe:
                for field, n in counts.items():
                    pipe.hincrby(keys.metrics_shard_n(self.shard), field, n)
                await pipe.execute()
        except BaseException:
            self._give_back(counts)
            raise

    async def run_async(self, r: aioredis.Redis) -> None:
        """Flush every `interval` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.flush_async(r)
                except (redis.RedisError, OSError) as exc:
                    log.warning("metrics: counters not flushed (kept for the next try): %s", exc)
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                await self.flush_async(r)


def outcome_label(outcome: Any) -> str:
    """A bounded label: the reply code of "550 5.1.1", a short word as it is, anything else "other"."""
    if outcome is None:
        return ""
    text = str(outcome)
    if re.match(r"[2-5]\d\d", text):
        return text[:3]
    return text if _WORD.fullmatch(text) else "other"


class MailCounters:
    """A MailLog sink: counts every mail-log event by event and outcome."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def event(self, event: str, fields: Mapping[str, Any]) -> None:
        self.counters.add(MAIL_EVENTS, event=event, outcome=outcome_label(fields.get("outcome")))


def totals(r: redis.Redis) -> dict[str, dict[tuple[tuple[str, str], ...], int]]:
    """Every shared counter, summed over the shards: name -> sorted labels -> count."""
    with r.pipeline(transaction=False) as pipe:
        for n in range(keys.METRICS_SHARDS):
            pipe.hgetall(keys.metrics_shard_n(n))
        shards = pipe.execute()
    out: dict[str, dict[tuple[tuple[str, str], ...], int]] = {}
    for shard in shards:
        for field, value in shard.items():
            name, labels = _parse_field(_text(field))
            key = tuple(sorted(labels.items()))
            series = out.setdefault(name, {})
            series[key] = series.get(key, 0) + int(value)
    return out


_COUNTER_DOCS = {
    MAIL_EVENTS: ("fallback_mail_events", "Mail-log events counted by the processes that count them "
                  "(SMTP receiver: received/queued with outcome 250, rejected/deferred with the reply "
                  "code; reconcile: reconciled/failed when run with counters; webmail: rejected "
                  "with 429 and alert at the per-user send limits)", ("event", "outcome")),
    WEBMAIL_LOGINS: ("fallback_webmail_logins", "Webmail log-in attempts by result: ok, failed (wrong "
                     "address or password, password too long, check timed out), throttled, busy (the "
                     "password-check queue was full), not_affected (right password, mailbox not "
                     "failed over)", ("result",)),
}


class ServiceCollector:
    """Reads the service's figures from Redis each time it is collected (one /metrics request)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fallback_redis_up", "1 when Redis answered this scrape")
        try:
            families = list(self._families())
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: Redis not answering: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        r = self.r
        counted = totals(r)
        for name, (metric, doc, labels) in _COUNTER_DOCS.items():
            family = CounterMetricFamily(metric, doc, labels=list(labels))
            for key, value in sorted(counted.get(name, {}).items()):
                got = dict(key)
                family.add_metric([got.get(label, "") for label in labels], value)
            yield family

        now_ms = health.redis_now_ms(r)
        depth = GaugeMetricFamily("fallback_queue_depth", "Messages waiting in a queue (outbound: "
                                  "webmail to smarthost; forward: healthy users to the main system)",
                                  labels=["queue"])
        age = GaugeMetricFamily("fallback_queue_oldest_age_seconds",
                                "How long the oldest waiting message of a queue has waited", labels=["queue"])
        dead = GaugeMetricFamily("fallback_queue_dead_letters", "Messages parked as dead letters",
                                 labels=["queue"])
        for b in health.backlogs(r):
            depth.add_metric([b.name], b.depth)
            age.add_metric([b.name], b.age(now_ms))
            dead.add_metric([b.name], b.dead)
        yield from (depth, age, dead)

        mem = health.memory(r)
        used = GaugeMetricFamily("fallback_redis_memory_used_bytes", "Memory Redis uses")
        used.add_metric([], mem.used)
        limit = GaugeMetricFamily("fallback_redis_memory_limit_bytes", "Redis maxmemory, or the "
                                  "machine's memory when there is none (source)", labels=["source"])
        limit.add_metric([mem.limit_source], mem.limit)
        yield from (used, limit)

        # Reconcile progress, cheaply: what the fallback holds per mailstore (the sharded
        # stats counters, no scan); what reconcile finished is in fallback_mail_events.
        stored = mailstore_stats(r)
        messages = GaugeMetricFamily("fallback_stored_messages", "Messages held here (reconciled "
                                     "or not; purge removes reconciled ones)", labels=["mailstore"])
        size = GaugeMetricFamily("fallback_stored_bytes", "Bytes of the messages held here",
                                 labels=["mailstore"])
        for name, row in sorted(stored.items()):
            messages.add_metric([name], row.get("messages", 0))
            size.add_metric([name], row.get("bytes", 0))
        yield from (messages, size)

        provisioned = {_text(k): int(v) for k, v in r.hgetall(keys.DIR_MAILSTORES).items()}
        scope = failover.read(r)
        boxes = GaugeMetricFamily("fallback_provisioned_mailboxes", "Provisioned mailboxes",
                                  labels=["mailstore"])
        covered = GaugeMetricFamily("fallback_failover_active", "1 when the mailstore's users are "
                                    "served here (failed over), 0 when their mail is forwarded",
                                    labels=["mailstore"])
        for name, n in sorted(provisioned.items()):
            boxes.add_metric([name], n)
            covered.add_metric([name], 1 if scope.covers(name) else 0)
        affected = GaugeMetricFamily("fallback_failover_affected_mailboxes",
                                     "Provisioned mailboxes the failover scope covers")
        affected.add_metric([], failover.affected_count(scope, provisioned))
        yield from (boxes, covered, affected)


def exposition(r: redis.Redis) -> bytes:
    """The Prometheus text of the whole service (a registry per call: no global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(r))
    return generate_latest(registry)
