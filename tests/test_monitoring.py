"""Shared counters, /metrics (parsed with prometheus_client's parser) and /readyz, on real servers."""

from __future__ import annotations

import asyncio
import random
import smtplib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from fallback import keys
from fallback.config import Settings
from fallback.mailbox import directory
from fallback.maillog import MailLog, _quote, format_event
from fallback.ops import failover, metrics
from fallback.queues import outbound
from fallback.redisconn import async_client
from fallback.service import SmtpComponent
from tests.servers import RedisServer, free_port
from tests.test_web_auth import login
from tests.webutil import make_app, put_message, simple


def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain" and "version=0.0.4" in response.headers["Content-Type"]
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def dead_client() -> redis.Redis:
    return redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def test_logins_queues_memory_and_scope_in_metrics(web_app: Any, r: redis.Redis) -> None:
    client = web_app.test_client()
    assert login(client, "alice@example.com").status_code == 302
    assert login(web_app.test_client(), "bob@example.com", password="wrong").status_code == 401
    put_message(r, "alice@example.com", simple())
    outbound.submit(r, sender="alice@example.com", mailstore="default", recipients=["x@remote.test"],
                    raw=simple(to="x@remote.test"), msg_id="01TESTMSGID00000000000000A")
    m = scrape(client)
    assert m[("fallback_redis_up", ())] == 1
    assert m[("fallback_webmail_logins_total", (("result", "ok"),))] == 1
    assert m[("fallback_webmail_logins_total", (("result", "failed"),))] == 1
    assert m[("fallback_queue_depth", (("queue", "outbound"),))] == 1
    assert m[("fallback_queue_depth", (("queue", "forward"),))] == 0
    assert m[("fallback_queue_dead_letters", (("queue", "outbound"),))] == 0
    assert m[("fallback_stored_messages", (("mailstore", "default"),))] == 2  # inbox + Sent copy
    assert m[("fallback_provisioned_mailboxes", (("mailstore", "default"),))] == 3
    assert m[("fallback_failover_affected_mailboxes", ())] == 3
    assert m[("fallback_redis_memory_used_bytes", ())] > 0
    assert m[("fallback_redis_memory_limit_bytes", (("source", "system"),))] > 0

    failover.start(r, ["elsewhere"])
    r.config_set("maxmemory", 512 * 1024 * 1024)
    try:
        m = scrape(client)
    finally:
        r.config_set("maxmemory", 0)
    assert m[("fallback_failover_active", (("mailstore", "default"),))] == 0
    assert m[("fallback_failover_affected_mailboxes", ())] == 0
    assert m[("fallback_redis_memory_limit_bytes", (("source", "maxmemory"),))] == 512 * 1024 * 1024


def test_metrics_counts_are_shared_across_processes(client: Any, r: redis.Redis, web_app: Any) -> None:
    # Another process's flushed counts (another webmail worker): /metrics shows the sum.
    other = metrics.Counters(shard=7)
    other.add(metrics.WEBMAIL_LOGINS, 5, result="ok")
    other.flush(r)
    assert login(client, "alice@example.com").status_code == 302
    assert scrape(client)[("fallback_webmail_logins_total", (("result", "ok"),))] == 6


def test_metrics_with_redis_down_says_so(settings: Settings) -> None:
    client = make_app(settings, dead_client()).test_client()
    m = scrape(client)
    assert m == {("fallback_redis_up", ()): 0}


def send(port: int) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        refused = s.sendmail("ann@remote.test", ["alice@example.com", "nobody@example.com",
                                                 "x@elsewhere.test"], simple())
        failover_forward = s.sendmail("ann@remote.test", ["bob@example.com"], simple(to="bob@example.com"))
    return {"refused": refused, "forward": failover_forward}


def test_receiver_counts_by_reply_code(settings: Settings, r: redis.Redis, redis_url: str,
                                       mailboxes: list[str], client: Any) -> None:
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    d.put(directory.Mailbox("bob@example.com", "healthy", d.get("bob@example.com").password_hash))
    failover.start(r, ["default"])  # bob's mailstore is not failed over: his mail is forwarded

    async def scenario() -> dict[str, Any]:
        ar = async_client(redis_url)
        buckets = await directory.ensure_buckets_async(ar, settings.directory_buckets)
        component = SmtpComponent(replace(settings, metrics_flush_interval=0.05), ar, buckets)
        await component.start()
        assert component.server is not None and component.server.server is not None
        port = component.server.server.sockets[0].getsockname()[1]
        result = await asyncio.to_thread(send, port)
        # The periodic flush, not the one at stop, brings the counts to Redis.
        deadline = time.monotonic() + 20
        while metrics.MAIL_EVENTS not in metrics.totals(r) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert metrics.MAIL_EVENTS in metrics.totals(r)
        await component.stop()
        await ar.aclose()
        return result

    result = asyncio.run(scenario())
    assert set(result["refused"]) == {"nobody@example.com", "x@elsewhere.test"}
    m = scrape(client)
    events = {dict(labels)["event"] + " " + dict(labels)["outcome"]: v for (name, labels), v in m.items()
              if name == "fallback_mail_events_total"}
    assert events == {"received 250": 1, "queued 250": 1, "rejected 550": 2}
    assert m[("fallback_queue_depth", (("queue", "forward"),))] == 1


def test_counters_survive_a_failed_flush_and_flush_at_cancel(r: redis.Redis, redis_url: str) -> None:
    c = metrics.Counters(interval=3600, shard=3)
    c.add(metrics.MAIL_EVENTS, event="received", outcome="250")
    with pytest.raises(redis.ConnectionError):
        c.flush(dead_client())
    c.add(metrics.MAIL_EVENTS, event="received", outcome="250")
    c.flush(r)
    assert metrics.totals(r)[metrics.MAIL_EVENTS] == {(("event", "received"), ("outcome", "250")): 2}

    async def cancelled() -> None:
        ar = async_client(redis_url)
        task = asyncio.create_task(c.run_async(ar))
        await asyncio.sleep(0)
        c.add(metrics.WEBMAIL_LOGINS, result="ok")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ar.aclose()

    asyncio.run(cancelled())
    assert metrics.totals(r)[metrics.WEBMAIL_LOGINS] == {(("result", "ok"),): 1}
    assert r.exists(keys.metrics_shard_n(3)) and not r.exists(keys.metrics_shard_n(4))


def test_maillog_sink_counts_reconcile_events(r: redis.Redis) -> None:
    c = metrics.Counters()
    log = MailLog(counters=metrics.MailCounters(c))
    log.reconciled("x", "a@example.com", outcome="appended")
    log.reconciled("y", "a@example.com", outcome="appended")
    log.failed("z", None, "a@example.com", stage="reconcile", reason="NO [OVERQUOTA]")
    c.flush(r)
    assert metrics.totals(r)[metrics.MAIL_EVENTS] == {
        (("event", "reconciled"), ("outcome", "appended")): 2, (("event", "failed"), ("outcome", "")): 1}


@pytest.mark.parametrize("outcome, label", [
    ("250", "250"), ("550 5.1.1", "550"), ("451 4.3.0", "451"), (None, ""), ("appended", "appended"),
    ("already-present", "already-present"), ("Some free text: with spaces", "other"), ("999x", "other"),
    ("a" * 40, "other"),
])
def test_outcome_labels_stay_bounded(outcome: Any, label: str) -> None:
    assert metrics.outcome_label(outcome) == label


# --- /readyz ---------------------------------------------------------------------------


def test_readyz_ready(client: Any) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200 and response.text == "ready\n"


def test_readyz_without_provisioned_mailboxes(settings: Settings, r: redis.Redis) -> None:
    response = make_app(settings, r).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.text == "not ready: no mailbox is provisioned yet (fallback provision)\n"


def test_readyz_redis_down(settings: Settings) -> None:
    response = make_app(settings, dead_client()).test_client().get("/readyz")
    assert response.status_code == 503 and response.text == "not ready: redis not answering\n"
    assert make_app(settings, dead_client()).test_client().get("/healthz").status_code == 503


def test_readyz_memory_full(client: Any, r: redis.Redis) -> None:
    r.config_set("maxmemory", 1)
    try:
        response = client.get("/readyz")
    finally:
        r.config_set("maxmemory", 0)
    assert response.status_code == 503
    assert response.text == "not ready: redis memory is full (maxmemory reached)\n"


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[redis.Redis]:
    server = RedisServer(tmp_path / "replica").start()
    client = redis.Redis.from_url(server.url)
    client.replicaof("127.0.0.1", free_port())  # a primary that is not there: stays a replica
    yield client
    client.close()
    server.stop()


def test_readyz_read_only_replica(settings: Settings, replica: redis.Redis) -> None:
    response = make_app(settings, replica).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.text == "not ready: redis is a read-only replica (log-ins and sent mail need writes)\n"


@pytest.mark.parametrize(("value", "written"), [
    ("alice@example.com", "alice@example.com"),
    ("", '""'),
    ("250 2.0.0", '"250 2.0.0"'),
    ("a=b", '"a=b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", "back\\\\slash"),
    ("two\r\nlines", "two\\r\\nlines"),
    ("no-break\u00a0space", '"no-break\u00a0space"'),
    (4096, "4096"),
])
def test_mail_log_quoting(value: Any, written: str) -> None:
    assert format_event("received", id="X", to=value, skipped=None) == f"event=received id=X to={written}"


def test_mail_log_lines_written_in_one_scan_match_the_value_by_value_quoting() -> None:
    # format_event writes a line with nothing to quote as it is, after one scan of all its
    # values: every line must be exactly what quoting each value on its own gives.
    rng = random.Random(17)
    alphabet = ['a', 'Z', '0', '@', '.', '-', ' ', '=', '"', '\\', '\r', '\n', '\t', '\x00',
                '\x1b', '\x7f', '\x85', '\u00a0', '\u2028', '\u3000', 'é', '']
    for _ in range(3000):
        values = {f"k{i}": "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 4)))
                  for i in range(rng.randrange(1, 6))}
        expected = " ".join(["event=e", *(f"{k}={_quote(v)}" for k, v in values.items())])
        assert format_event("e", **values) == expected, values


def test_mail_log_quotes_every_kind_of_whitespace() -> None:
    # One line per event, split on spaces by operators' tools: anything str.isspace() calls a
    # space must be inside quotes, or escaped where it is a control character or a line
    # separator (tests/test_maillog.py: those never appear as they are).
    for code in range(0x3100):
        ch = chr(code)
        if not ch.isspace():
            continue
        written = format_event("e", v=f"a{ch}b")
        if code < 0x20 or 0x7F <= code <= 0x9F or ch in "\u2028\u2029":
            assert ch not in written and written.startswith("event=e v=a\\"), hex(code)
        else:
            assert written == f'event=e v="a{ch}b"', hex(code)
