"""The forward queue: scoped intake (mailbox vs forward queue) and forwarding to a real next hop.

The next hop is Postfix's smtp-sink (SMTP and LMTP, dumping what it took) and,
for byte-for-byte checks of what went over the wire, an aiosmtpd server that
keeps every message it was given.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from aiosmtpd.controller import Controller

from fallback import ids, keys
from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox import fields, store
from fallback.maillog import LOGGER_NAME
from fallback.ops import failover, health
from fallback.queues import forward
from fallback.redisconn import async_client, is_cluster
from tests.conftest import add_mailbox
from tests.servers import SmtpSink, free_port, sink_payload, stop_pid, wait_for

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
SENDER = "sender@remote.test"


@pytest.fixture
def users(r: redis.Redis, settings: Settings) -> dict[str, str]:
    """alice on store1, bob on store2, carol on store3."""
    boxes = {ALICE: "store1", BOB: "store2", CAROL: "store3"}
    for address, mailstore in boxes.items():
        add_mailbox(r, settings, address, mailstore=mailstore)
    return boxes


def send(port: int, rcpts: list[str], body: bytes, sender: str = SENDER) -> str:
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(sender)
        for rcpt in rcpts:
            assert smtp.rcpt(rcpt)[0] == 250
        code, reply = smtp.data(body)
    assert code == 250, reply
    return re.search(rb"id=([0-9A-Z]{26})", reply).group(1).decode()  # type: ignore[union-attr]


def forwarded(r: redis.Redis, rcpt: str, msg_id: str) -> dict[str, bytes]:
    fields: Any = r.hgetall(keys.forward_record(rcpt, msg_id))
    return {k.decode(): v for k, v in fields.items()}


def stream_entries(r: redis.Redis, rcpt: str) -> list[dict[bytes, bytes]]:
    entries: Any = r.xrange(keys.forward_stream(rcpt))
    return [fields for _, fields in entries]


def in_mailbox(r: redis.Redis, rcpt: str, msg_id: str) -> bytes | None:
    return store.MailboxReader(r, rcpt).raw(msg_id)


# --- intake: the scope decides per recipient ---------------------------------------------

def test_scoped_intake_mixed_recipients_in_one_data(r: redis.Redis, users: dict[str, str],
                                                    receiver_factory: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    failover.start(r, ["store1"])
    rt = receiver_factory()
    body = b"Subject: mixed\r\n\r\n8-bit \xc3\xa9 and a bare\nLF\r\n"
    msg_id = send(rt.port, [ALICE, BOB], body)
    # Right after the 250, before any worker ran: both kinds are already written.
    kept = in_mailbox(r, ALICE, msg_id)
    assert kept is not None and kept.endswith(b"8-bit \xc3\xa9 and a bare\r\nLF\r\n")
    assert in_mailbox(r, BOB, msg_id) is None and r.zcard(keys.folder(BOB, fields.INBOX)) == 0
    rec = forwarded(r, BOB, msg_id)
    assert rec["raw"] == kept and rec["sender"] == SENDER.encode() and rec["attempts"] == b"0"
    assert stream_entries(r, BOB) == [{b"a": BOB.encode(), b"id": msg_id.encode()}]
    assert not r.exists(keys.forward_record(ALICE, msg_id))
    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME]
    assert any(ln.startswith("event=queued") and f"to={BOB}" in ln and "route=forward" in ln
               for ln in lines), lines
    assert any(ln.startswith("event=received") and f"to={ALICE}" in ln and "route=mailbox" in ln
               for ln in lines), lines
    # The forward queue's health reading sees it, no consumer group yet.
    assert [b.depth for b in health.backlogs(r) if b.name == "forward"] == [1]


def test_failover_stop_sends_new_mail_to_the_forward_queue(r: redis.Redis, users: dict[str, str],
                                                         receiver_factory: Any) -> None:
    """Both directions: a mailstore leaves the scope (its mailbox stays for reconcile), another joins."""
    failover.start(r, ["store1"])
    rt = receiver_factory(failover_cache_ttl=0.001)
    before = send(rt.port, [ALICE, BOB], b"Subject: one\r\n\r\nbefore\r\n")
    assert in_mailbox(r, ALICE, before) and forwarded(r, BOB, before)
    failover.stop(r, ["store1"])
    failover.start(r, ["store2"])
    time.sleep(0.01)  # past the scope cache's ttl (1 ms)
    after = send(rt.port, [ALICE, BOB], b"Subject: two\r\n\r\nafter\r\n")
    assert forwarded(r, ALICE, after) and in_mailbox(r, ALICE, after) is None
    assert in_mailbox(r, BOB, after) is not None and not forwarded(r, BOB, after)
    # alice's fallback mailbox keeps what it had, still waiting for reconcile.
    assert in_mailbox(r, ALICE, before) is not None
    assert r.sismember(keys.pending(ALICE), before)


def test_before_any_failover_everyone_is_served_here(r: redis.Redis, users: dict[str, str],
                                                     receiver_factory: Any) -> None:
    rt = receiver_factory()
    msg_id = send(rt.port, [ALICE, BOB, CAROL], b"Subject: all\r\n\r\nx\r\n")
    for rcpt in (ALICE, BOB, CAROL):
        assert in_mailbox(r, rcpt, msg_id) is not None and not forwarded(r, rcpt, msg_id)
    assert all(b.depth == 0 for b in health.backlogs(r))


def test_failed_write_answers_451_and_leaves_nothing(r: redis.Redis, users: dict[str, str],
                                                     receiver_factory: Any) -> None:
    """The mixed write is one MULTI/EXEC: refused as a whole (here: maxmemory), nothing half done."""
    if is_cluster(r):
        pytest.skip("on a Redis Cluster the write is one per slot; tests/test_cluster.py shows a "
                    "partial write's retry completing without doubles")
    failover.start(r, ["store1"])
    rt = receiver_factory(memory_reserve="100GiB")  # past the guard: the write itself is refused
    old: Any = r.config_get("maxmemory")["maxmemory"]
    r.config_set("maxmemory", 1)
    try:
        with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
            smtp.ehlo("x")
            smtp.mail(SENDER)
            smtp.rcpt(ALICE)
            smtp.rcpt(BOB)
            code, _ = smtp.data(b"Subject: full\r\n\r\nx\r\n")
    finally:
        r.config_set("maxmemory", old)
    assert code == 451
    assert not r.keys("mbx:*:m:*") and not r.keys("fwdq:*:r:*")
    assert all(b.depth == 0 for b in health.backlogs(r))


# --- the worker against real next hops ---------------------------------------------------

class ForwarderThread:
    """The real forward worker on its own event loop in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.forwarder: forward.Forwarder | None = None

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> str:
        self.forwarder = forward.Forwarder(self.settings, async_client(self.settings.redis_url or ""))
        return await self.forwarder.start()

    def start(self) -> ForwarderThread:
        self.thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        if self.forwarder is not None:
            self.call(self.forwarder.stop())
            self.call(self.forwarder.r.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def fwd_settings(settings: Settings) -> Settings:
    return replace(settings, forward_retry_base=0.2, forward_retry_max_interval=0.5, claim_timeout=1.0,
                   worker_concurrency=2, forward_timeout=10.0)


@pytest.fixture
def forwarders(fwd_settings: Settings) -> Iterator[Callable[[str], ForwarderThread]]:
    started: list[ForwarderThread] = []

    def make(url: str, **overrides: Any) -> ForwarderThread:
        ft = ForwarderThread(replace(fwd_settings, forward_to=url, **overrides)).start()
        started.append(ft)
        return ft

    yield make
    for ft in started:
        ft.stop()


@pytest.fixture
def sinks() -> Iterator[Callable[..., SmtpSink]]:
    made: list[SmtpSink] = []

    def make(args: list[str] | None = None, port: int | None = None) -> SmtpSink:
        sink = SmtpSink(args, port=port).start()
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.cleanup()


def queued(r: redis.Redis, users: dict[str, str], receiver_factory: Any, body: bytes,
           rcpts: tuple[str, ...] = (BOB,), sender: str = SENDER) -> str:
    """Intake through the real receiver, with only store1 failed over: bob and carol are forwarded."""
    failover.start(r, ["store1"])
    rt = receiver_factory()
    msg_id = send(rt.port, list(rcpts), body, sender)
    for rcpt in rcpts:
        assert forwarded(r, rcpt, msg_id)
    return msg_id


def attempts(r: redis.Redis, rcpt: str, msg_id: str) -> int:
    value: Any = r.hget(keys.forward_record(rcpt, msg_id), "attempts")
    return int(value or 0)


def queue_is_empty(r: redis.Redis) -> bool:
    return all(b.depth == 0 and b.dead == 0 for b in health.backlogs(r) if b.name == "forward")


def test_next_hop_down_then_up_delivers_once_with_exact_bytes(
        r: redis.Redis, users: dict[str, str], receiver_factory: Any, sinks: Any, forwarders: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    body = b"Subject: down then up\r\nFrom: <x@remote.test>\r\n\r\n\xc3\xa9t\xc3\xa9\r\n.leading dot\r\n"
    msg_id = queued(r, users, receiver_factory, body)
    raw = forwarded(r, BOB, msg_id)["raw"]
    port = free_port()
    forwarders(f"smtp://127.0.0.1:{port}")
    wait_for(lambda: attempts(r, BOB, msg_id) >= 2, what="two failed attempts while the hop is down")
    rec = forwarded(r, BOB, msg_id)
    assert rec["code"] == b"0" and b"next hop smtp://127.0.0.1" in rec["reply"]
    sink = sinks(port=port)
    wait_for(lambda: not r.exists(keys.forward_record(BOB, msg_id)), what="delivery after the hop came up")
    wait_for(lambda: queue_is_empty(r), what="the queue to drain")
    [dump] = sink.messages()
    assert f"X-Mail-Args: <{SENDER}>".encode() in dump
    rcpts, payload = sink_payload(dump)
    assert rcpts == [BOB] and payload == raw.replace(b"\r\n", b"\n")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME]
    assert any(ln.startswith("event=forwarded") and "route=forward" in ln and f"id={msg_id}" in ln
               for ln in lines)


class Capture:
    """aiosmtpd handler that keeps each transaction exactly as it came over the wire."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 kept"


@pytest.fixture
def capture() -> Iterator[tuple[Capture, int]]:
    handler = Capture()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False)
    ctl.start()
    yield handler, port
    ctl.stop()


def test_bytes_and_null_sender_arrive_unchanged(r: redis.Redis, users: dict[str, str],
                                                receiver_factory: Any, forwarders: Any,
                                                capture: tuple[Capture, int]) -> None:
    handler, port = capture
    body = (b"Subject: bounce of something\r\n\r\nno final newline, 8-bit \xff\xfe, long "
            + b"x" * 900 + b"\r\n.\r\n..two dots\r\nend")
    msg_id = queued(r, users, receiver_factory, body, rcpts=(BOB, CAROL), sender="")
    raws = {rcpt: forwarded(r, rcpt, msg_id)["raw"] for rcpt in (BOB, CAROL)}
    assert {forwarded(r, rcpt, msg_id)["sender"] for rcpt in (BOB, CAROL)} == {b""}
    forwarders(f"smtp://127.0.0.1:{port}")
    wait_for(lambda: len(handler.got) == 2, what="both recipients")
    wait_for(lambda: queue_is_empty(r), what="the queue to drain")
    by_rcpt = {rcpts[0]: (sender, rcpts, data) for sender, rcpts, data in handler.got}
    for rcpt in (BOB, CAROL):
        sender, rcpts, data = by_rcpt[rcpt]
        assert sender == "<>" and rcpts == [rcpt]  # aiosmtpd's spelling of the null sender
        assert data == raws[rcpt]
        assert forwarded(r, rcpt, msg_id) == {}
        assert not r.exists(keys.forward_record(rcpt, msg_id))


def test_attempts_that_keep_dying_back_off_then_deliver(
        r: redis.Redis, users: dict[str, str], receiver_factory: Any, forwarders: Any,
        capture: tuple[Capture, int], caplog: pytest.LogCaptureFixture) -> None:
    """A record whose attempts never finished max_crashes times waits the longest interval, then goes."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    handler, port = capture
    msg_id = queued(r, users, receiver_factory, b"Subject: poison?\r\n\r\nx\r\n")
    r.hset(keys.forward_record(BOB, msg_id), "runs", 5)  # as if five workers had died on it
    forwarders(f"smtp://127.0.0.1:{port}", max_crashes=5)
    wait_for(lambda: handler.got, what="the delivery after the back-off")
    wait_for(lambda: queue_is_empty(r), what="the queue to drain")
    assert len(handler.got) == 1 and not r.exists(keys.forward_record(BOB, msg_id))
    lines = [ln for ln in (rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME)
             if f"id={msg_id}" in ln]
    events = [ln.split()[0] for ln in lines]
    # Put back first (alerted, no attempt made), then forwarded on its first real attempt.
    assert events == ["event=queued", "event=alert", "event=forwarded"], lines
    assert "5 unfinished attempts" in lines[1] and "attempts=1" in lines[2]


def test_lmtp_next_hop(r: redis.Redis, users: dict[str, str], receiver_factory: Any, sinks: Any,
                       forwarders: Any) -> None:
    msg_id = queued(r, users, receiver_factory, b"Subject: lmtp\r\n\r\nvia LMTP\r\n")
    raw = forwarded(r, BOB, msg_id)["raw"]
    sink = sinks(["-L"])
    forwarders(f"lmtp://127.0.0.1:{sink.port}")
    wait_for(lambda: not r.exists(keys.forward_record(BOB, msg_id)), what="LMTP delivery")
    [dump] = sink.messages()
    assert b"X-Client-Proto: LMTP" in dump and f"X-Mail-Args: <{SENDER}>".encode() in dump
    assert sink_payload(dump) == ([BOB], raw.replace(b"\r\n", b"\n"))


def test_4xx_then_2xx(r: redis.Redis, users: dict[str, str], receiver_factory: Any, sinks: Any,
                      forwarders: Any) -> None:
    msg_id = queued(r, users, receiver_factory, b"Subject: soft\r\n\r\nlater\r\n")
    deferring = sinks(["-r", "RCPT"])
    forwarders(f"smtp://127.0.0.1:{deferring.port}")
    wait_for(lambda: attempts(r, BOB, msg_id) >= 1, what="a deferred attempt")
    rec = forwarded(r, BOB, msg_id)
    assert rec["code"] == b"450" and rec["reply"].startswith(b"450 4.3.0")
    port = deferring.port
    deferring.stop()
    accepting = sinks(port=port)
    wait_for(lambda: not r.exists(keys.forward_record(BOB, msg_id)), what="delivery after 4xx")
    assert len(accepting.messages()) == 1 and deferring.messages() == []


def test_5xx_is_kept_retried_and_alerted_never_bounced(
        r: redis.Redis, users: dict[str, str], receiver_factory: Any, sinks: Any, forwarders: Any,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    caplog.set_level(logging.INFO)
    msg_id = queued(r, users, receiver_factory, b"Subject: hard\r\n\r\nrefused\r\n")
    refusing = sinks(["-f", "RCPT"])
    forwarders(f"smtp://127.0.0.1:{refusing.port}", forward_alert_age=0.001)
    wait_for(lambda: attempts(r, BOB, msg_id) >= 2, what="two refused attempts")
    rec = forwarded(r, BOB, msg_id)
    assert rec["code"] == b"500" and rec["raw"].endswith(b"refused\r\n") and rec["sender"] == SENDER.encode()
    # Never bounced: no failure notice, nothing queued outbound, nothing in anyone's mailbox.
    assert not r.keys("outq:*") and not r.keys("mbx:*:out:*") and not r.keys("mbx:*:m:*")
    assert refusing.messages() == []
    [b] = [b for b in health.backlogs(r) if b.name == "forward"]
    assert b.depth == 1 and b.dead == 0 and b.refused == 1 and b.oldest_ms == ids.id_time_ms(msg_id)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME]
    alerts = [ln for ln in lines if ln.startswith("event=alert") and f"id={msg_id}" in ln]
    assert any("permanent refusal" in ln for ln in alerts), lines
    assert any("forward_alert_age" in ln for ln in alerts), lines
    assert not any(ln.startswith(("event=bounced", "event=failed")) for ln in lines)
    # `fallback check` warns on its age (the forward queue's threshold is forward_alert_age).
    code = main(["check", "--redis-url", redis_url, "--warn-queue-age", "3600", "--crit-queue-age", "7200",
                 "--allow-no-aof"])
    line = capsys.readouterr().out.strip()
    # Younger than any age threshold, but refused: a WARNING for a person to look at.
    assert code == 1 and "forward queue 1 refused by the next hop (5xx)" in line, line


def test_check_warns_on_old_forwarded_mail(r: redis.Redis, redis_url: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    now_ms = health.redis_now_ms(r)
    old = ids.new_id(now_ms - 2 * 3600 * 1000)
    with r.pipeline(transaction=True) as pipe:
        forward.queue_forward(pipe, BOB, old, b"Subject: old\r\n\r\nx\r\n", SENDER, time.time() - 7200)
        pipe.execute()
    code = main(["check", "--redis-url", redis_url, "--allow-no-aof", "--warn-queue-age", "1h",
                 "--crit-queue-age", "4h"])
    line = capsys.readouterr().out.strip()
    assert code == 1 and "forward queue 1 oldest 2.0h" in line, line
    env_code = subprocess.run(
        [sys.executable, "-m", "fallback", "check", "--redis-url", redis_url, "--allow-no-aof",
         "--warn-queue-age", "4h", "--crit-queue-age", "5h"],
        env={"FALLBACK_FORWARD_ALERT_AGE": "1h", "PATH": "/usr/bin:/bin"}, capture_output=True,
        check=False).returncode
    assert env_code == 1  # below --warn-queue-age, but past forward_alert_age


# --- a worker process SIGKILLed in the middle of a delivery ------------------------------

def worker_process(redis_url: str, port: int, tmp: Path, name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fallback", "worker", "--redis-url", redis_url,
           "--forward-to", f"smtp://127.0.0.1:{port}", "--forward-retry-base", "0.2",
           "--claim-timeout", "1", "--worker-concurrency", "1", "--hostname", "fallback.test"]
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def test_worker_killed_mid_delivery_delivers_after_restart(
        r: redis.Redis, users: dict[str, str], receiver_factory: Any, sinks: Any, redis_url: str,
        tmp_path: Path) -> None:
    msg_id = queued(r, users, receiver_factory, b"Subject: crash\r\n\r\nsurvives\r\n")
    raw = forwarded(r, BOB, msg_id)["raw"]
    slow = sinks(["-v", "-w", "60"])  # takes the connection, then sits on DATA (-v: logs it)
    first = worker_process(redis_url, slow.port, tmp_path, "first")
    try:
        lease = keys.forward_lease(BOB, msg_id)
        wait_for(lambda: r.exists(lease), what="the first worker to take the message")
        wait_for(lambda: b"DATA" in (slow.dir / "sink.log").read_bytes(), what="the delivery under way")
        stop_pid(first, signal.SIGKILL)
    finally:
        stop_pid(first, signal.SIGKILL)
    assert r.exists(keys.forward_record(BOB, msg_id))  # killed: still queued
    port = slow.port
    slow.stop()
    good = sinks(port=port)
    second = worker_process(redis_url, port, tmp_path, "second")
    try:
        wait_for(lambda: not r.exists(keys.forward_record(BOB, msg_id)), what="delivery after restart")
        wait_for(lambda: queue_is_empty(r), what="the queue to drain")
    finally:
        stop_pid(second)
    [dump] = good.messages()
    assert sink_payload(dump) == ([BOB], raw.replace(b"\r\n", b"\n"))
    assert not any(b"survives" in m for m in slow.messages())  # it never got the message itself
    assert b"forward worker" in (tmp_path / "second.log").read_bytes()


def test_bad_forward_to_is_refused_with_one_line(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    for command in ("worker", "smtp", "up"):
        for bad in ("smtp://nohost", "http://x:25", "lmtp://h:99999", "smtp:/x:25"):
            code = main([command, "--redis-url", redis_url, "--forward-to", bad])
            err = capsys.readouterr().err.strip()
            assert code == 1 and err.startswith(f"fallback {command}: forward_to: "), err
            assert len(err.splitlines()) == 1
