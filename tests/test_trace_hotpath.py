"""What the receiver pays per event for counting and tracing, and that it loses nothing.

MailCounters remembers the counter field of each (event, outcome) it has seen
(fallback/ops/metrics.py): its counts must be the ones the plain `Counters.add`
path gives, at its memory's limit and past it.  And the trace waits in memory
between flushes: the receiver's last events are written when it stops, however
long its flush interval.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import redis

from fallback import keys
from fallback.config import Settings
from fallback.mailbox import directory
from fallback.ops import failover, metrics, trace
from fallback.redisconn import async_client
from fallback.service import SmtpComponent
from tests.conftest import add_mailbox
from tests.test_trace import Loop
from tests.test_trace_encoding import HOSTILE, every_event

ALICE, NOBODY = "alice@example.com", "nobody@example.com"


def reference(events: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, int]:
    """The counts of `events` by the plain path: a field built for every event."""
    plain = metrics.Counters()
    for event, fields in events:
        outcome = fields.get("outcome")
        plain.add(metrics.MAIL_EVENTS, event=event, outcome=metrics.outcome_label(outcome))
        queue = fields.get("route") or fields.get("stage")
        if queue in metrics.QUEUES:
            plain.add(metrics.QUEUE_EVENTS, queue=str(queue), event=event,
                      outcome=metrics.outcome_label(outcome or fields.get("reply")))
    return plain._take()


def test_remembered_counter_fields_count_as_the_plain_path() -> None:
    events = [(e, dict(f)) for n, value in enumerate(HOSTILE) for e, f in every_event(value, n)]
    # Outcomes as the processes write them, and odd ones: the label of each stays bounded.
    for outcome in ("250", "451 4.3.0", "550 5.1.1", "dead-letter", 421, None, "", "x" * 500, "2500"):
        events.append(("rejected", {"id": "M", "to": ALICE, "outcome": outcome}))
    counters = metrics.Counters()
    counting = metrics.MailCounters(counters)
    for event, fields in events * 3:
        counting.event(event, fields)
    assert counters._take() == {f: n * 3 for f, n in reference(events).items()}


def test_the_field_memory_at_its_limit_and_one_past_it() -> None:
    counters = metrics.Counters()
    counting = metrics.MailCounters(counters)
    at = [("rejected", {"id": "M", "to": ALICE, "outcome": f"code-{i}"}) for i in range(metrics.FIELD_MEMORY)]
    for event, fields in at:
        counting.event(event, fields)
    assert len(counting._fields) == metrics.FIELD_MEMORY  # at the limit: all remembered
    past = ("rejected", {"id": "M", "to": ALICE, "outcome": "one-more"})
    counting.event(*past)
    assert len(counting._fields) == 1  # one past: the memory starts again, nothing miscounted
    counting.event(*at[0])
    assert counters._take() == reference([*at, past, at[0]])


def send_two(port: int) -> list[str]:
    """A message from each of two loopback addresses, each with a refused recipient; their ids."""
    ids = []
    for source in ("127.0.0.2", "127.0.0.3"):
        with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0)) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("sender@remote.test")[0] == 250
            assert smtp.rcpt(NOBODY)[0] == 550
            assert smtp.rcpt(ALICE)[0] == 250
            code, reply = smtp.data(b"Subject: last\r\n\r\nbefore the stop\r\n")
        assert code == 250
        ids.append(re.search(rb"id=([0-9A-Z]{26})", reply).group(1).decode())  # type: ignore[union-attr]
    return ids


def test_the_receivers_last_events_are_traced_when_it_stops(r: redis.Redis, settings: Settings) -> None:
    add_mailbox(r, settings, ALICE)
    failover.start(r, ["default"])  # alice's mail is kept here
    hour = replace(settings, metrics_flush_interval=3600.0)  # no flush would come before the stop
    loop = Loop()
    try:
        async def start() -> tuple[SmtpComponent, int]:
            ar = async_client(hour.redis_url or "")
            buckets = await directory.ensure_buckets_async(ar, hour.directory_buckets)
            component = SmtpComponent(hour, ar, buckets, url=hour.redis_url or "")
            said = await component.start()
            return component, int(said.rsplit(":", 1)[1])
        component, port = loop.call(start())

        async def stop() -> None:
            await component.stop()
            await component.r.aclose()
        try:
            ids = send_two(port)
            assert component.counters is not None and component.counters.trace is not None
            assert component.counters.trace.pending() == 4  # waiting: nothing written yet
            assert not any(r.exists(keys.trace(i)) for i in ids)
        finally:
            loop.call(stop())
    finally:
        loop.close()
    for msg_id, peer in zip(ids, ("127.0.0.2", "127.0.0.3"), strict=True):
        evs = trace.message(r, msg_id) or []
        assert sorted((e["event"], e["to"], e["peer"]) for e in evs) == [
            ("received", ALICE, peer), ("rejected", NOBODY, peer)]
    assert [m["id"] for m in trace.recent(r, ALICE)] == ids[::-1]
    counted = metrics.totals(r)[metrics.MAIL_EVENTS]
    assert counted[(("event", "received"), ("outcome", "250"))] == 2
    assert counted[(("event", "rejected"), ("outcome", "550"))] == 2

