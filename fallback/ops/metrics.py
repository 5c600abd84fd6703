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
from fallback.maillog import MailLog
from fallback.ops import failover, health, intakerate, watch
from fallback.ops.trace import TraceBuffer

log = logging.getLogger(__name__)

MAIL_EVENTS = "mail_events"        # labels: event, outcome (reply code for the receiver's events)
WEBMAIL_LOGINS = "webmail_logins"  # labels: result
ADMIN_AUTH_FAILURES = "admin_auth_failures"  # labels: reason (issue 16: admin API tokens refused)
QUEUE_EVENTS = "queue_events"      # labels: queue, event, outcome (the peer's reply code)
WEBMAIL_RESPONSES = "webmail_responses"  # labels: status (2xx, 3xx, 4xx, 5xx)
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
                 clock: Callable[[], float] = time.monotonic, trace: TraceBuffer | None = None) -> None:
        # Issue 16: the message trace rides on the same flushes (fallback/ops/trace.py).
        self.trace = trace
        # A random shard per process: flushes of many processes spread over the hashes.
        self.shard = secrets.randbelow(keys.METRICS_SHARDS) if shard is None else shard
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._flushed_at = clock()

    def add(self, name: str, n: int = 1, **labels: str) -> None:
        self.add_field(_field(name, labels), n)

    def add_field(self, field: str, n: int = 1) -> None:
        """Count under a field `_field` made (a hot path's own memory of it)."""
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
        if self.trace is not None:
            self.trace.flush(r)  # never raises: a trace is diagnostics
        counts = self._take()
        if not counts:
            return
        try:
            with r.pipeline(transaction=True) as pipe:
                for field, n in counts.items():
                    pipe.hincrby(keys.metrics_shard_n(self.shard), field, n)
                intakerate.queue_minute(pipe, self.shard, counts, MAIL_EVENTS)  # issue 16: the console
                pipe.execute()
        except BaseException:
            self._give_back(counts)
            raise

    async def flush_async(self, r: aioredis.Redis) -> None:
        if self.trace is not None:
            await self.trace.flush_async(r)  # never raises: a trace is diagnostics
        counts = self._take()
        if not counts:
            return
        try:
            async with r.pipeline(transaction=True) as pipe:
                for field, n in counts.items():
                    pipe.hincrby(keys.metrics_shard_n(self.shard), field, n)
                intakerate.queue_minute(pipe, self.shard, counts, MAIL_EVENTS)  # issue 16: the console
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


QUEUES = ("outbound", "forward")
FIELD_MEMORY = 1024  # (event, outcome) pairs a MailCounters remembers the counter field of


class MailCounters:
    """A MailLog sink: counts every mail-log event by event and outcome.

    Events of the two queues (route= or stage= outbound/forward: queued, sent, deferred,
    bounced, forwarded, failed, alert) are also counted by queue, with the peer's reply
    code as outcome when there is one, so that a deferral of the smarthost and one of the
    main system's next hop can be told apart."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        # (event, outcome) -> its counter field: the receiver counts every recipient, and
        # building the field (labels sorted, cleaned, the outcome's code) costs more than the
        # count.  Outcomes are nearly always reply codes; the memory is dropped when full.
        self._fields: dict[tuple[str, Any], str] = {}

    def _mail_field(self, event: str, outcome: Any) -> str:
        key = (event, outcome if outcome is None or type(outcome) is str else str(outcome))
        field = self._fields.get(key)
        if field is None:
            if len(self._fields) >= FIELD_MEMORY:
                self._fields = {}
            field = self._fields[key] = _field(MAIL_EVENTS, {"event": event,
                                                             "outcome": outcome_label(outcome)})
        return field

    def event(self, event: str, fields: Mapping[str, Any]) -> None:
        outcome = fields.get("outcome")
        if self.counters.trace is not None:
            self.counters.trace.event(event, fields)
        self.counters.add_field(self._mail_field(event, outcome))
        queue = fields.get("route") or fields.get("stage")
        if queue in QUEUES:
            self.counters.add(QUEUE_EVENTS, queue=str(queue), event=event,
                              outcome=outcome_label(outcome or fields.get("reply")))


def mail_counting(interval: float, trace: TraceBuffer | None = None) -> tuple[MailLog, Counters]:
    """A mail log that counts (and traces) what it logs, and the counters to flush
    (`Counters.run_async`)."""
    counters = Counters(interval, trace=trace)
    return MailLog(counters=MailCounters(counters)), counters


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
    QUEUE_EVENTS: ("fallback_queue_events", "Mail-log events of the outbound (webmail to smarthost) "
                   "and forward (healthy users to the main system) queues by event (queued, sent, "
                   "deferred, bounced, forwarded, failed with outcome dead-letter when parked, "
                   "alert) and outcome (the peer's reply code, other without one)",
                   ("queue", "event", "outcome")),
    WEBMAIL_RESPONSES: ("fallback_webmail_responses", "HTTP responses of the webmail by status class "
                        "(2xx, 3xx, 4xx, 5xx), /metrics and /healthz included", ("status",)),
    WEBMAIL_LOGINS: ("fallback_webmail_logins", "Webmail log-in attempts by result: ok, failed (wrong "
                     "address or password, password too long, check timed out), throttled, busy (the "
                     "password-check queue was full), not_affected (right password, mailbox not "
                     "failed over)", ("result",)),
    ADMIN_AUTH_FAILURES: ("fallback_admin_auth_failures", "Admin API requests refused for their token, "
                          "by reason: missing, wrong, expired, revoked, throttled (the brute-force "
                          "guard of one client prefix)", ("reason",)),
}


class ServiceCollector:
    """Reads the service's figures from Redis each time it is collected (one /metrics request)."""

    def __init__(self, r: redis.Redis, memory_reserve: str | None = None) -> None:
        self.r = r
        self.memory_reserve = memory_reserve  # the setting; None: the reserve is not exported

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

    def _reserve_and_aof(self) -> Iterator[Metric]:
        """Issue 16 (alerting): what the rules of deploy/prometheus compare memory and durability with."""
        if self.memory_reserve is not None:
            _, at = health.memory_reserve(self.r, self.memory_reserve)
            if at is not None:  # maxmemory 0 and a percentage: nothing to take a share of
                reserve = GaugeMetricFamily("fallback_redis_memory_reserve_bytes", "Redis used_memory "
                                            "at which new mail gets 452 (memory_reserve of maxmemory)")
                reserve.add_metric([], at)
                yield reserve
        try:
            aof = health.aof(self.r)
        except redis.ResponseError:  # INFO forbidden on a managed Redis: nothing to say
            return
        for name, value, doc in (
                ("enabled", aof.enabled, "1 when every primary has the AOF on (accepted mail is durable)"),
                ("last_write_ok", aof.last_write_ok, "0 when a primary's last AOF write failed "
                 "(aof_last_write_status err: Redis refuses writes, the receiver answers 451)"),
                ("last_bgrewrite_ok", aof.last_rewrite_ok, "0 when a primary's last AOF rewrite failed "
                 "(aof_last_bgrewrite_status err: the AOF grows until one succeeds)")):
            family = GaugeMetricFamily(f"fallback_redis_aof_{name}", doc)
            family.add_metric([], 1 if value else 0)
            yield family

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
        held = GaugeMetricFamily("fallback_queue_held", "Messages an operator holds in a queue",
                                 labels=["queue"])
        for b in health.backlogs(r):
            depth.add_metric([b.name], b.depth)
            age.add_metric([b.name], b.age(now_ms))
            dead.add_metric([b.name], b.dead)
            held.add_metric([b.name], b.held)
        yield from (depth, age, dead, held)

        mem = health.memory(r)
        used = GaugeMetricFamily("fallback_redis_memory_used_bytes", "Memory Redis uses")
        used.add_metric([], mem.used)
        limit = GaugeMetricFamily("fallback_redis_memory_limit_bytes", "Redis maxmemory, or the "
                                  "machine's memory when there is none (source)", labels=["source"])
        limit.add_metric([mem.limit_source], mem.limit)
        yield from (used, limit)
        yield from self._reserve_and_aof()

        # What the fallback holds per mailstore and how far reconcile is with it: the sharded
        # stats counters, no scan.
        stored = mailstore_stats(r)
        messages = GaugeMetricFamily("fallback_stored_messages", "Messages held here (reconciled "
                                     "or not; purge removes reconciled ones)", labels=["mailstore"])
        size = GaugeMetricFamily("fallback_stored_bytes", "Bytes of the messages held here",
                                 labels=["mailstore"])
        for name, row in sorted(stored.items()):
            messages.add_metric([name], row.get("messages", 0))
            size.add_metric([name], row.get("bytes", 0))
        yield from (messages, size)
        yield reconcile_progress(stored, reconcile_counts(r))

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
        yield from probe_families(watch.records(r))


def probe_families(found: list[watch.Record]) -> Iterator[Metric]:
    """Issue 18: what `fallback watch` last published per mailstore (gone when no watcher runs)."""
    label = ["mailstore"]
    up = GaugeMetricFamily("fallback_mailstore_probe_up", "1 when the watcher's last IMAP probe of the "
                           "mailstore passed (connect, login, SELECT, NOOP, LOGOUT within slow-after)",
                           labels=label)
    seconds = GaugeMetricFamily("fallback_mailstore_probe_seconds", "Duration of each step of the last "
                                "probe (connect, login, select, noop, logout) and in total",
                                labels=["mailstore", "step"])
    failures = GaugeMetricFamily("fallback_mailstore_probe_consecutive_failures",
                                 "Probes of the mailstore that failed in a row", labels=label)
    success = GaugeMetricFamily("fallback_mailstore_probe_last_success_timestamp_seconds",
                                "When a probe of the mailstore last passed (Unix time)", labels=label)
    failing = GaugeMetricFamily("fallback_mailstore_probe_failing", "1 when the mailstore failed "
                                "fail-after probes in a row (alerted; failed over with auto-failover)",
                                labels=label)
    healthy = GaugeMetricFamily("fallback_mailstore_probe_healthy_again", "1 when a failed-over "
                                "mailstore has answered every probe for healthy-after: an operator "
                                "decides whether to reconcile and end the failover", labels=label)
    blind = GaugeMetricFamily("fallback_mailstore_probe_config_problem", "1 when the watcher cannot "
                              "probe the mailstore because of its own configuration (master login "
                              "refused everywhere, host name not resolving)", labels=label)
    for rec in found:
        name = [rec.mailstore]
        up.add_metric(name, 1 if rec.up else 0)
        for step, value in rec.steps.items():
            seconds.add_metric([rec.mailstore, step], value)
        seconds.add_metric([rec.mailstore, "total"], rec.total)
        failures.add_metric(name, rec.failures)
        if rec.last_success is not None:
            success.add_metric(name, rec.last_success)
        failing.add_metric(name, 1 if rec.failing else 0)
        healthy.add_metric(name, 1 if rec.healthy_again else 0)
        blind.add_metric(name, 1 if rec.config_problem else 0)
    yield from (up, seconds, failures, success, failing, healthy, blind)


RECONCILE_STATES = ("pending", "appending", "done", "failed")


def reconcile_counts(r: redis.Redis) -> dict[str, dict[str, int]]:
    """mailstore -> state (appending, done, failed) -> messages, summed over the shards that the
    state scripts of fallback/reconcile/state.py (and purge) keep: no scan."""
    with r.pipeline(transaction=False) as pipe:
        for n in range(keys.STATS_SHARDS):
            pipe.hgetall(keys.reconcile_counts_shard_n(n))
        shards = pipe.execute()
    out: dict[str, dict[str, int]] = {}
    for shard in shards:
        for field, value in shard.items():
            mailstore, _, state = _text(field).partition("\t")
            row = out.setdefault(mailstore, {})
            row[state] = row.get(state, 0) + int(value)
    return out


def reconcile_progress(stored: Mapping[str, Mapping[str, int]],
                       counted: Mapping[str, Mapping[str, int]]) -> Metric:
    """Messages held here per mailstore and reconcile state, exactly: appending, done and
    failed as the state scripts counted them; pending is every other message held."""
    family = GaugeMetricFamily("fallback_reconcile_messages", "Messages held here by reconcile "
                               "state: pending (not yet in the main store), appending (being "
                               "appended now, or when a run stopped), done, failed (the main "
                               "store said NO; retried by the next run)", labels=["mailstore", "state"])
    for name, counts in reconcile_table(stored, counted).items():
        for state in RECONCILE_STATES:
            family.add_metric([name, state], counts[state])
    return family


def reconcile_table(stored: Mapping[str, Mapping[str, int]],
                    counted: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """mailstore -> state -> messages (every state of RECONCILE_STATES), as the gauge and the
    admin console show them."""
    out: dict[str, dict[str, int]] = {}
    for name in sorted(set(stored) | set(counted)):
        row = counted.get(name, {})
        # Below 0 only if a state was written behind the scripts' back: show what can be true.
        counts = {state: max(0, row.get(state, 0)) for state in RECONCILE_STATES[1:]}
        counts["pending"] = max(0, stored.get(name, {}).get("messages", 0) - sum(counts.values()))
        out[name] = counts
    return out


def exposition(r: redis.Redis, memory_reserve: str | None = None) -> bytes:
    """The Prometheus text of the whole service (a registry per call: no global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(r, memory_reserve))
    return generate_latest(registry)
