"""Outbound delivery end to end: queue -> worker -> a real smarthost (Postfix's smtp-sink).

Per-address outcomes (one recipient accepts, one defers, one is rejected in
the same transaction) and STARTTLS with AUTH cannot be had from smtp-sink,
whose replies are per command: those tests use aiosmtpd as the smarthost,
with a reply table per address.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import ids, keys
from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox import fields, store
from fallback.queues import outbound
from fallback.queues.worker import Worker
from fallback.redisconn import async_client
from tests.servers import SmtpSink, free_port, sink_payload, stop_pid, wait_for

SENDER = "alice@example.com"


def compose(subject: str, to: list[str], extra: str = "") -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n{extra}"
            f"\r\nHello from the fallback.\r\n").encode()


def queue_message(r: redis.Redis, rcpts: list[str], subject: str = "hi", extra: str = "") -> str:
    msg_id = ids.new_id()
    outbound.submit(r, sender=SENDER, mailstore="default", recipients=rcpts,
                    raw=compose(subject, rcpts, extra), msg_id=msg_id)
    return msg_id


def states(r: redis.Redis, msg_id: str) -> dict[str, str]:
    return {a: str(st["state"]) for a, st in outbound.recipient_status(r, SENDER, msg_id).items()}


def inbox(r: redis.Redis) -> list[bytes]:
    reader = store.MailboxReader(r, SENDER)
    return [reader.raw(i) or b"" for i in reader.ids(fields.INBOX)]


def queue_is_empty(r: redis.Redis) -> bool:
    return not outbound.scan(r)


class WorkerThread:
    """The real worker on its own event loop in a thread (as `fallback worker` runs it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.worker: Worker | None = None

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> str:
        self.worker = Worker(self.settings, async_client(self.settings.redis_url or ""))
        return await self.worker.start()

    def start(self) -> WorkerThread:
        self.thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        if self.worker is not None:
            self.call(self.worker.stop())
            self.call(self.worker.r.aclose())
            self.worker = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def out_settings(settings: Settings) -> Settings:
    return replace(settings, smarthost_tls="none", retry_base=0.2, retry_max_interval=0.5,
                   claim_timeout=1.0, worker_concurrency=2, smarthost_timeout=10.0)


@pytest.fixture
def sinks() -> Iterator[Callable[..., SmtpSink]]:
    started: list[SmtpSink] = []

    def make(args: list[str] | None = None, port: int | None = None) -> SmtpSink:
        sink = SmtpSink(args, port).start()
        started.append(sink)
        return sink

    yield make
    for sink in started:
        sink.cleanup()


@pytest.fixture
def workers(out_settings: Settings) -> Iterator[Callable[..., WorkerThread]]:
    started: list[WorkerThread] = []

    def make(**overrides: Any) -> WorkerThread:
        wt = WorkerThread(replace(out_settings, **overrides)).start()
        started.append(wt)
        return wt

    yield make
    for wt in started:
        wt.stop()


def smarthost(port: int) -> str:
    return f"127.0.0.1:{port}"


# --- accept --------------------------------------------------------------------------------

def test_accepted_message_is_sent_once_as_stored(r, sinks, workers) -> None:
    sink = sinks()
    msg_id = queue_message(r, ["bob@remote.test", "carol@remote.test"], "accept")
    workers(smarthost=smarthost(sink.port))
    wait_for(lambda: set(states(r, msg_id).values()) == {"delivered"}, what="delivery")
    wait_for(lambda: queue_is_empty(r), what="an empty queue")
    dumps = sink.messages()
    assert len(dumps) == 1
    rcpts, body = sink_payload(dumps[0])
    assert sorted(rcpts) == ["bob@remote.test", "carol@remote.test"]
    sent_copy = store.MailboxReader(r, SENDER).raw(msg_id)
    assert sent_copy is not None
    # Message-ID and Date were added at submit, so the Sent copy is what went out.
    assert sent_copy.startswith(f"Message-ID: <{msg_id}@example.com>\r\nDate: ".encode())
    assert body == sent_copy.replace(b"\r\n", b"\n")
    status = outbound.recipient_status(r, SENDER, msg_id)
    assert all(st["attempts"] == 1 and str(st["reply"]).startswith("250") for st in status.values())
    assert not r.smembers(keys.outbox(SENDER))
    assert inbox(r) == []  # no notice for a success


def test_existing_message_id_and_date_are_kept(r) -> None:
    raw = compose("keep", ["b@x.test"],
                  "Message-ID: <own@x.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n")
    assert outbound.ensure_headers(raw, SENDER, "ID", 0) == raw
    lf = raw.replace(b"\r\n", b"\n").replace(b"Message-ID: <own@x.test>\n", b"")
    added = outbound.ensure_headers(lf, SENDER, "ID", 0)
    assert added == b"Message-ID: <ID@example.com>\n" + lf


# --- temporary failure, then success -------------------------------------------------------

def test_deferred_then_delivered(r, sinks, workers) -> None:
    port = free_port()
    deferring = sinks(["-r", "RCPT"], port=port)
    msg_id = queue_message(r, ["bob@remote.test"], "later")
    workers(smarthost=smarthost(port))

    def retried() -> bool:
        st = outbound.recipient_status(r, SENDER, msg_id)["bob@remote.test"]
        return st["state"] == "deferred" and int(st["attempts"]) >= 2  # type: ignore[call-overload]

    wait_for(retried, what="two deferred attempts")
    st = outbound.recipient_status(r, SENDER, msg_id)["bob@remote.test"]
    assert str(st["reply"]).startswith("450 4.3.0")
    assert float(st["next"]) > float(st["last"])  # type: ignore[arg-type]
    assert deferring.messages() == []
    deferring.stop()
    accepting = sinks(port=port)
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "delivered"}, what="delivery")
    wait_for(lambda: queue_is_empty(r), what="an empty queue")
    assert len(accepting.messages()) == 1
    assert inbox(r) == []


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(7)
    for attempts, nominal in ((1, 60), (2, 120), (3, 240), (10, 3600)):
        delays = [outbound.backoff(attempts, 60, 3600, rng) for _ in range(200)]
        assert nominal * 0.75 <= min(delays) and max(delays) <= nominal * 1.25
        assert max(delays) - min(delays) > nominal * 0.2  # jitter spreads them


# --- permanent failure -> DSN --------------------------------------------------------------

def test_permanent_failure_puts_a_dsn_in_the_senders_inbox(r, sinks, workers) -> None:
    sink = sinks(["-f", "RCPT", "-B", "550 5.1.1 Recipient address rejected: no such user"])
    msg_id = queue_message(r, ["nobody@remote.test"], "bounce me")
    workers(smarthost=smarthost(sink.port))
    wait_for(lambda: states(r, msg_id) == {"nobody@remote.test": "failed"}, what="failure")
    wait_for(lambda: inbox(r), what="the notice")
    wait_for(lambda: queue_is_empty(r), what="an empty queue")
    [notice] = inbox(r)
    check_dsn(notice, {"nobody@remote.test": "5.1.1"}, "bounce me")
    diagnostic = dsn_fields(notice)["nobody@remote.test"]["diagnostic-code"]
    assert diagnostic.startswith("smtp; 550 5.1.1 Recipient address rejected")
    assert sink.messages() == []
    assert store.MailboxReader(r, SENDER).raw(msg_id) is not None  # the Sent copy stays


def dsn_fields(raw: bytes) -> dict[str, dict[str, str]]:
    """Per-recipient fields of a notice's message/delivery-status part."""
    msg = message_from_bytes(raw, policy=default_policy)
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    payload = part.get_payload()
    text = payload if isinstance(payload, str) else "\r\n\r\n".join(
        str(p).strip() for p in payload)  # the parser may split the blocks into sub-messages
    out: dict[str, dict[str, str]] = {}
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = {}
        for line in block.strip().splitlines():
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "final-recipient" in fields:
            out[fields["final-recipient"].split(";")[1].strip()] = fields
    return out


def check_dsn(raw: bytes, expected: dict[str, str], subject: str) -> None:
    msg = message_from_bytes(raw, policy=default_policy)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == SENDER
    assert msg["Auto-Submitted"] == "auto-replied"
    types = [p.get_content_type() for p in msg.iter_parts()]  # type: ignore[attr-defined]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    fields = dsn_fields(raw)
    assert set(fields) == set(expected)
    for address, status in expected.items():
        assert fields[address]["action"] == "failed"
        assert fields[address]["status"] == status
    headers_part = list(msg.iter_parts())[2]  # type: ignore[attr-defined]
    assert f"Subject: {subject}" in headers_part.get_payload()
    assert b"Hello from the fallback" not in raw  # headers only, not the body


# --- mixed recipients (aiosmtpd: per-address replies) --------------------------------------

class TableHandler:
    """aiosmtpd handler answering RCPT from a table: address -> list of replies, one per attempt."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = {a: list(v) for a, v in table.items()}
        self.delivered: list[tuple[list[str], bytes]] = []
        self.tls_sessions: list[bool] = []

    async def handle_RCPT(self, server, session, envelope, address, options) -> str:
        replies = self.table.get(address, ["250 2.1.5 Ok"])
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server, session, envelope) -> str:
        self.delivered.append((list(envelope.rcpt_tos), envelope.original_content))
        self.tls_sessions.append(session.ssl is not None)
        return "250 2.0.0 Ok: queued"


def test_mixed_recipients(r, workers) -> None:
    from aiosmtpd.controller import Controller

    handler = TableHandler({
        "ok@remote.test": ["250 2.1.5 Ok"],
        "later@remote.test": ["451 4.2.0 Mailbox busy, try later", "250 2.1.5 Ok"],
        "no@remote.test": ["550 5.1.1 User unknown"],
    })
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        rcpts = ["ok@remote.test", "later@remote.test", "no@remote.test"]
        msg_id = queue_message(r, rcpts, "mixed")
        workers(smarthost=smarthost(port))
        wait_for(lambda: states(r, msg_id) == {"ok@remote.test": "delivered", "later@remote.test":
                                               "delivered", "no@remote.test": "failed"}, what="outcomes")
        wait_for(lambda: queue_is_empty(r), what="an empty queue")
        # One transaction per attempt, and ok@ is not in the second one.
        assert [sorted(t) for t, _ in handler.delivered] == [["ok@remote.test"], ["later@remote.test"]]
        status = outbound.recipient_status(r, SENDER, msg_id)
        assert status["later@remote.test"]["attempts"] == 2
        assert status["ok@remote.test"]["attempts"] == 1
        [notice] = inbox(r)
        check_dsn(notice, {"no@remote.test": "5.1.1"}, "mixed")
    finally:
        ctl.stop()


# --- smarthost down for a while ------------------------------------------------------------

def test_smarthost_down_then_back(r, sinks, workers) -> None:
    port = free_port()  # nothing listens yet
    msg_id = queue_message(r, ["bob@remote.test"], "down")
    workers(smarthost=smarthost(port))

    def two_failures() -> bool:
        st = outbound.recipient_status(r, SENDER, msg_id)["bob@remote.test"]
        return int(st["attempts"]) >= 2  # type: ignore[call-overload]

    wait_for(two_failures, what="two failed connection attempts")
    st = outbound.recipient_status(r, SENDER, msg_id)["bob@remote.test"]
    assert st["state"] == "deferred"
    assert "connection to smarthost 127.0.0.1:" in str(st["reply"])
    sink = sinks(port=port)
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "delivered"}, what="delivery")
    assert len(sink.messages()) == 1
    assert inbox(r) == []


# --- deadline ------------------------------------------------------------------------------

def test_deadline_fails_the_recipient_with_a_notice(r, sinks, workers) -> None:
    sink = sinks(["-r", "RCPT"])
    msg_id = queue_message(r, ["slow@remote.test"], "too slow")
    workers(smarthost=smarthost(sink.port), retry_deadline=1.5)
    wait_for(lambda: states(r, msg_id) == {"slow@remote.test": "failed"}, what="the deadline")
    st = outbound.recipient_status(r, SENDER, msg_id)["slow@remote.test"]
    assert str(st["reply"]).startswith("gave up after 1.5 seconds: 450 4.3.0")
    [notice] = wait_for(lambda: inbox(r), what="the notice")
    check_dsn(notice, {"slow@remote.test": "4.4.7"}, "too slow")
    wait_for(lambda: queue_is_empty(r), what="an empty queue")


# --- several workers, no double delivery ---------------------------------------------------

def test_two_workers_deliver_each_message_once(r, sinks, workers) -> None:
    sink = sinks()
    msg_ids = [queue_message(r, [f"u{i}@remote.test"], f"load {i}") for i in range(40)]
    workers(smarthost=smarthost(sink.port), worker_concurrency=4)
    workers(smarthost=smarthost(sink.port), worker_concurrency=4)
    wait_for(lambda: all(states(r, m) == {f"u{i}@remote.test": "delivered"}
                         for i, m in enumerate(msg_ids)), what="40 deliveries")
    ids_seen = [sink_payload(d)[1].split(b"\n", 1)[0] for d in sink.messages()]
    assert len(ids_seen) == 40 and len(set(ids_seen)) == 40


# --- worker SIGKILLed mid-delivery ---------------------------------------------------------

def worker_process(settings: Settings, port: int, tmp: Path, name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fallback", "worker", "--redis-url", settings.redis_url or "",
           "--smarthost", smarthost(port), "--smarthost-tls", "none", "--retry-base", "0.2",
           "--claim-timeout", "1", "--worker-concurrency", "1", "--hostname", "fallback.test"]
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def test_worker_killed_mid_delivery_delivers_exactly_once(r, settings, sinks, tmp_path) -> None:
    # The sink waits 2 s before answering DATA: a kill then lands inside a transaction.
    sink = sinks(["-w", "2"])
    msg_ids = [queue_message(r, [f"k{i}@remote.test", f"j{i}@remote.test"], f"kill {i}")
               for i in range(4)]
    first = worker_process(settings, sink.port, tmp_path, "first")
    try:
        delivered = lambda: [m for m in msg_ids if set(states(r, m).values()) == {"delivered"}]  # noqa: E731
        wait_for(lambda: len(delivered()) >= 1, what="a first delivery")
        in_flight = wait_for(lambda: [m for m in msg_ids if r.exists(keys.outbound_lease(SENDER, m))
                                      and m not in delivered()], what="a delivery under way")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        stop_pid(first, signal.SIGKILL)
    victim = in_flight[0]
    assert set(states(r, victim).values()) == {"queued"}
    second = worker_process(settings, sink.port, tmp_path, "second")
    try:
        wait_for(lambda: all(set(states(r, m).values()) == {"delivered"} for m in msg_ids),
                 timeout=60, what="every message delivered after the restart")
        wait_for(lambda: queue_is_empty(r), what="an empty queue")
    finally:
        stop_pid(second)
    per_message: dict[bytes, list[str]] = {}
    for dump in sink.messages():
        rcpts, body = sink_payload(dump)
        per_message.setdefault(body.split(b"\n", 1)[0], []).extend(rcpts)
    assert len(per_message) == 4
    for m, i in zip(msg_ids, range(4), strict=True):
        assert sorted(per_message[f"Message-ID: <{m}@example.com>".encode()]) == sorted(
            [f"k{i}@remote.test", f"j{i}@remote.test"])
    assert second.returncode == 0  # SIGTERM: a clean stop


# --- poison --------------------------------------------------------------------------------

def test_poison_message_is_parked_not_dropped_and_can_be_retried(r, sinks, workers, settings,
                                                                capsys) -> None:
    sink = sinks()
    msg_id = queue_message(r, ["bob@remote.test"], "poison")
    rec_key = keys.outbound_record(SENDER, msg_id)
    good = r.hget(rec_key, "recipients")
    r.hset(rec_key, "recipients", "{not json")  # every attempt now raises
    workers(smarthost=smarthost(sink.port), max_crashes=2, claim_timeout=0.3)
    wait_for(lambda: r.zcard(keys.outbound_dead_n(keys.outbound_shard(SENDER))), what="the dead letter")
    assert sink.messages() == []
    assert store.MailboxReader(r, SENDER).raw(msg_id) is not None
    assert b"taken up 2 times" in (r.hget(rec_key, "dead") or b"")
    assert main(["queue", "list", "--format", "json", "--redis-url", settings.redis_url]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["total"] == 1
    [row] = listing["messages"]
    assert row["id"] == msg_id and row["state"] == "dead"
    assert "damaged delivery record" in row["last_reply"]
    # The operator repairs the record and retries: delivered once.
    r.hset(rec_key, "recipients", good)  # type: ignore[arg-type]
    assert main(["queue", "retry", msg_id, "--redis-url", settings.redis_url]) == 0
    wait_for(lambda: states(r, msg_id) == {"bob@remote.test": "delivered"}, what="delivery after retry")
    wait_for(lambda: queue_is_empty(r), what="an empty queue")
    assert len(sink.messages()) == 1


def test_malformed_queue_entry_is_parked_and_listed(r, sinks, workers, settings, capsys) -> None:
    sink = sinks()
    stream = keys.outbound_stream_n(3)
    entry = r.xadd(stream, {"junk": "no sender, no id"}).decode()
    good = queue_message(r, ["bob@remote.test"], "after the junk")
    workers(smarthost=smarthost(sink.port))
    wait_for(lambda: r.zcard(keys.outbound_dead_n(3)), what="the parked entry")
    wait_for(lambda: states(r, good) == {"bob@remote.test": "delivered"}, what="the good message")
    assert r.zrange(keys.outbound_dead_n(3), 0, -1) == [f"{entry}\t?".encode()]
    assert main(["queue", "list", "--format", "json", "--redis-url", settings.redis_url]) == 0
    [row] = json.loads(capsys.readouterr().out)["messages"]
    assert row["state"] == "dead" and row["last_reply"] == "no delivery record"
    assert main(["queue", "delete", entry, "--yes", "--redis-url", settings.redis_url]) == 0
    assert queue_is_empty(r)
