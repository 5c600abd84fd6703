"""The message trace (fallback/ops/trace.py, `fallback trace`) against the real parts.

One message's life end to end: the real receiver (smtplib from two loopback
addresses), the forward worker to Postfix's smtp-sink answering 4xx then 2xx,
reconcile into a real Dovecot, purge; the outbound worker's deferral, delivery
and bounce; then the caps, the retention, the CLI's output and its errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import smtplib
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.cli import main
from fallback.config import Settings, load_settings
from fallback.intake.receiver import ReceiverServer
from fallback.mailbox import directory
from fallback.maillog import MailLog
from fallback.ops import failover, metrics, trace
from fallback.ops.trace import TraceBuffer
from fallback.queues import forward
from fallback.queues.worker import Worker
from fallback.redisconn import async_client
from tests.conftest import add_mailbox
from tests.dovecot import DovecotServer, MainStoreView
from tests.reconcile_helpers import cli_args, reconcile_settings
from tests.reconcile_helpers import state as reconcile_state
from tests.servers import SmtpSink, free_port, wait_for
from tests.test_outbound import queue_message

ALICE, BOB, NOBODY = "alice@example.com", "bob@example.com", "nobody@example.com"
SENDER = "sender@remote.test"
FLUSH = 0.1  # seconds between the processes' flushes here (5 s in production)


class Loop:
    """An event loop in a thread, running one component as its process would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stops: list[Any] = []

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def receiver(self, settings: Settings) -> int:
        """The receiver as `fallback smtp` makes it: its mail log counts and traces."""
        async def start() -> int:
            r = async_client(settings.redis_url or "")
            counters = metrics.Counters(FLUSH, trace=TraceBuffer.for_settings(settings, "intake"))
            buckets = await directory.ensure_buckets_async(r, settings.directory_buckets)
            server = ReceiverServer(settings, r, buckets, MailLog(counters=metrics.MailCounters(counters)))
            port = await server.start()
            flusher = asyncio.create_task(counters.run_async(r))

            async def stop() -> None:
                await server.stop(grace=5)
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
                await r.aclose()
            self.stops.append(stop)
            return port
        return int(self.call(start()))

    def queue_worker(self, kind: str, settings: Settings) -> None:
        """The forward or outbound worker, with the mail log `fallback worker` gives it."""
        async def start() -> None:
            r = async_client(settings.redis_url or "")
            mail, counters = metrics.mail_counting(FLUSH, TraceBuffer.for_settings(settings, kind))
            cls = forward.Forwarder if kind == "forward" else Worker
            w = cls(settings, r, mail=mail, counters=counters)
            await w.start()

            async def stop() -> None:
                await w.stop()
                await r.aclose()
            self.stops.append(stop)
        self.call(start())

    def close(self) -> None:
        for stop in reversed(self.stops):
            self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def loop() -> Any:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def sinks() -> Any:
    started: list[SmtpSink] = []

    def make(args: list[str] | None = None, port: int | None = None) -> SmtpSink:
        sink = SmtpSink(args, port).start()
        started.append(sink)
        return sink
    yield make
    for sink in started:
        sink.cleanup()


def events_of(r: redis.Redis, msg_id: str) -> list[dict[str, Any]]:
    return trace.message(r, msg_id) or []


def has(r: redis.Redis, msg_id: str, event: str, **match: Any) -> bool:
    return any(e["event"] == event and all(e.get(k) == v for k, v in match.items())
               for e in events_of(r, msg_id))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- one message's life, end to end --------------------------------------------------------

@pytest.mark.dovecot
@pytest.mark.slow
def test_a_message_traced_from_intake_to_forward_reconcile_and_purge(
        r: redis.Redis, settings: Settings, dovecot_factory: Any, loop: Loop, sinks: Any,
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich's tables as wide as an operator's terminal
    add_mailbox(r, settings, ALICE, mailstore="store1")
    add_mailbox(r, settings, BOB, mailstore="store2")
    failover.start(r, ["store1"])  # alice's mail is kept here, bob's goes on to the main system
    server: DovecotServer = dovecot_factory([ALICE])
    s = replace(reconcile_settings(settings, server, tmp_path), forward_retry_base=0.2,
                forward_retry_max_interval=0.5, claim_timeout=1.0, forward_timeout=10.0)
    port = loop.receiver(s)
    hop = free_port()
    deferring = sinks(["-r", "RCPT"], port=hop)  # the main system's next hop: 450 to every RCPT
    loop.queue_worker("forward", replace(s, forward_to=f"smtp://127.0.0.1:{hop}"))

    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(SENDER)
        assert smtp.rcpt(ALICE)[0] == 250
        assert smtp.rcpt(NOBODY)[0] == 550
        assert smtp.rcpt(BOB)[0] == 250
        code, reply = smtp.data(b"Subject: traced\r\n\r\nfollow me\r\n")
    assert code == 250
    msg_id = re.search(rb"id=([0-9A-Z]{26})", reply).group(1).decode()  # type: ignore[union-attr]

    wait_for(lambda: has(r, msg_id, "deferred", to=BOB), what="the next hop's 4xx in the trace")
    deferred = next(e for e in events_of(r, msg_id) if e["event"] == "deferred")
    assert deferred["component"] == "forward" and str(deferred["reply"]).startswith("450")
    deferring.stop()
    sinks(port=hop)  # the next hop takes it now
    wait_for(lambda: has(r, msg_id, "forwarded", to=BOB), what="the forward in the trace")

    assert main(cli_args(s, "--user", ALICE)) == 0  # fallback reconcile, into the real Dovecot
    wait_for(lambda: has(r, msg_id, "reconciled", to=ALICE), what="the reconcile in the trace")
    view = MainStoreView(server, ALICE)
    try:
        uids = [m["uid"] for m in view.messages("INBOX")]
    finally:
        view.close()
    assert len(uids) == 1
    assert reconcile_state(r, ALICE, msg_id)["rstate"] == "done"
    assert main(["purge", "--reconciled", "--yes", "--redis-url", s.redis_url or ""]) == 0
    assert has(r, msg_id, "purged", to=ALICE)

    code, out, err = run_cli(capsys, "trace", msg_id, "--format", "json", "--redis-url", s.redis_url or "")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["id"] == msg_id
    steps = [(e["component"], e["event"], e.get("to")) for e in doc["events"]]
    # The rejected RCPT of the same transaction is traced too, in its place.
    assert steps[:2] == [("intake", "rejected", NOBODY)] or ("intake", "rejected", NOBODY) in steps
    life = [x for x in steps if x[1] != "rejected"]
    assert life[:2] in ([("intake", "received", ALICE), ("intake", "queued", BOB)],
                        [("intake", "queued", BOB), ("intake", "received", ALICE)])
    rest = [x for x in life[2:] if x[1] != "deferred"]
    assert rest == [("forward", "forwarded", BOB), ("reconcile", "reconciled", ALICE),
                    ("purge", "purged", ALICE)]
    assert [x for x in life if x[1] == "deferred"] and all(x == ("forward", "deferred", BOB)
                                                           for x in life if x[1] == "deferred")
    times = [e["time"] for e in doc["events"]]
    assert times == sorted(times)
    reconciled = next(e for e in doc["events"] if e["event"] == "reconciled")
    assert reconciled["uid"] == uids[0] and reconciled["outcome"] == "appended"
    assert reconciled["folder"] == "INBOX"
    received = next(e for e in doc["events"] if e["event"] == "received")
    assert received["peer"] == "127.0.0.2" and received["outcome"] == "250" and received["from"] == SENDER
    forwarded = next(e for e in doc["events"] if e["event"] == "forwarded")
    assert str(forwarded["reply"]).startswith("250")

    code, out, err = run_cli(capsys, "trace", msg_id, "--redis-url", s.redis_url or "")
    assert code == 0, err
    table = " ".join(out.split())
    for word in ("received", "queued", "deferred", "forwarded", "reconciled", "purged",
                 f"uid={uids[0]}", "450", "550 5.1.1"):
        assert word in table, (word, out)
    assert out.index("received") < out.index("forwarded") < out.index("reconciled") < out.index("purged")

    # The refused recipient is found by its address, with its last state.
    code, out, err = run_cli(capsys, "trace", "--address", NOBODY, "--format", "json",
                             "--redis-url", s.redis_url or "")
    assert code == 0, err
    listed = json.loads(out)
    assert [m["id"] for m in listed] == [msg_id]
    assert listed[0]["last"]["event"] == "rejected" and listed[0]["last"]["outcome"] == "550 5.1.1"
    assert listed[0]["from"] == SENDER
    code, out, _ = run_cli(capsys, "trace", "--address", BOB, "--since", "1h", "--redis-url",
                           s.redis_url or "")
    assert code == 0 and msg_id in out and "forwarded" in out
    code, out, _ = run_cli(capsys, "trace", "--address", SENDER.upper(), "--format", "json",
                           "--redis-url", s.redis_url or "")
    assert [m["id"] for m in json.loads(out)] == [msg_id]  # the sender's side too, any case


def test_outbound_attempts_with_the_peers_replies_and_the_bounce(
        r: redis.Redis, settings: Settings, loop: Loop, sinks: Any) -> None:
    port = free_port()
    deferring = sinks(["-r", "RCPT"], port=port)
    s = replace(settings, smarthost=f"127.0.0.1:{port}", smarthost_tls="none", retry_base=0.2,
                retry_max_interval=0.5, claim_timeout=1.0, smarthost_timeout=10.0)
    later = queue_message(r, ["bob@remote.test"], "later")
    loop.queue_worker("outbound", s)
    wait_for(lambda: sum(e["event"] == "deferred" for e in events_of(r, later)) >= 2,
             what="two deferred attempts in the trace")
    deferring.stop()
    accepting = sinks(port=port)
    wait_for(lambda: has(r, later, "sent", to="bob@remote.test"), what="the delivery in the trace")
    evs = events_of(r, later)
    assert [e["event"] for e in evs][-1] == "sent"
    assert all(e["component"] == "outbound" for e in evs)
    assert all(str(e["reply"]).startswith("450") for e in evs if e["event"] == "deferred")
    assert str(evs[-1]["reply"]).startswith("250")
    attempts = [e["attempts"] for e in evs]
    assert attempts == sorted(attempts) and attempts[-1] == len(evs)

    # A permanent refusal: bounced with the peer's reply, and the notice (DSN) to the sender.
    accepting.stop()
    sinks(["-f", "RCPT"], port=port)
    refused = queue_message(r, ["carol@remote.test"], "refused")
    wait_for(lambda: has(r, refused, "failed", to="carol@remote.test"), what="the notice in the trace")
    evs = events_of(r, refused)
    assert [e["event"] for e in evs] == ["bounced", "failed"]
    assert evs[0]["reply"] == "500 5.3.0 Error: command failed"  # smtp-sink -f RCPT, word for word
    notice = evs[1]["notice"]
    assert re.fullmatch(r"[0-9A-Z]{26}", notice) and evs[1]["stage"] == "outbound"


# --- caps, retention, buffering ----------------------------------------------------------

def flush_events(r: redis.Redis, buf: TraceBuffer, msg_id: str, n: int, start: int = 0, **extra: Any) -> None:
    for i in range(start, start + n):
        buf.event("deferred", {"id": msg_id, "from": SENDER, "to": BOB, "reply": f"450 try {i}", **extra})
    buf.flush(r)


def test_a_record_keeps_at_most_cap_lines_its_first_and_its_newest(r: redis.Redis) -> None:
    buf = TraceBuffer(3600, "forward")
    flush_events(r, buf, "M1", trace.CAP)  # at the limit: all kept, no marker
    evs = events_of(r, "M1")
    assert len(evs) == trace.CAP and [e["reply"] for e in evs] == [f"450 try {i}" for i in range(trace.CAP)]
    flush_events(r, buf, "M1", 1, start=trace.CAP)  # one past: one dropped, after the first HEAD
    lines = r.lrange(keys.trace("M1"), 0, -1)
    assert len(lines) == trace.CAP
    evs = [trace.decode(x) for x in lines]
    assert [e["reply"] for e in evs[:trace.HEAD]] == [f"450 try {i}" for i in range(trace.HEAD)]
    assert evs[trace.HEAD] == {"time": None, "component": "-", "event": "trimmed", "dropped": 2}
    assert evs[-1]["reply"] == f"450 try {trace.CAP}"
    # kept: HEAD first + the newest CAP-HEAD-1; dropped: the two in between (one made room for the marker)
    assert [e["reply"] for e in evs[trace.HEAD + 1:]] == [
        f"450 try {i}" for i in range(trace.HEAD + 2, trace.CAP + 1)]
    flush_events(r, buf, "M1", 200, start=trace.CAP + 1)  # a big batch at once
    evs = [trace.decode(x) for x in r.lrange(keys.trace("M1"), 0, -1)]
    assert len(evs) == trace.CAP and evs[trace.HEAD]["dropped"] == 202
    assert evs[-1]["reply"] == f"450 try {trace.CAP + 200}"
    assert trace.message(r, "M1")[trace.HEAD]["event"] == "trimmed"  # type: ignore[index]


def test_each_field_is_capped(r: redis.Redis) -> None:
    buf = TraceBuffer(3600, "outbound")
    at, past = "x" * trace.VALUE_CAP, "y" * (trace.VALUE_CAP + 1)
    buf.event("deferred", {"id": "M2", "to": BOB, "reply": at, "reason": past})
    buf.flush(r)
    [e] = events_of(r, "M2")
    assert e["reply"] == at
    assert len(e["reason"]) == trace.VALUE_CAP and e["reason"].endswith("…")


def test_the_address_index_keeps_the_newest_cap_messages(r: redis.Redis) -> None:
    buf = TraceBuffer(3600, "intake")
    for i in range(trace.ADDRESS_CAP):
        buf.event("received", {"id": f"A{i:05d}", "from": SENDER, "to": ALICE, "outcome": "250"})
    buf.flush(r)
    assert r.zcard(keys.trace_address(ALICE)) == trace.ADDRESS_CAP  # at the limit
    buf.event("received", {"id": "NEWEST", "from": SENDER, "to": ALICE, "outcome": "250"})
    buf.flush(r)
    assert r.zcard(keys.trace_address(ALICE)) == trace.ADDRESS_CAP  # one past: the oldest goes
    assert r.zscore(keys.trace_address(ALICE), "A00000") is None
    assert r.zscore(keys.trace_address(ALICE), "NEWEST") is not None
    newest = trace.recent(r, ALICE, limit=2)
    assert [m["id"] for m in newest] == ["NEWEST", f"A{trace.ADDRESS_CAP - 1:05d}"]
    assert newest[0]["last"]["event"] == "received" and newest[0]["to"] == [ALICE]


def test_buffer_cap_and_a_failed_write_lose_no_250_and_keep_the_events(
        r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fallback.ops.trace")
    buf = TraceBuffer(3600, "intake", buffer_cap=10)
    for i in range(11):  # one past the limit
        buf.event("received", {"id": f"B{i}", "to": ALICE})
    assert buf.pending() == 10 and buf.dropped == 1
    down = async_client(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    async def fail() -> None:
        await buf.flush_async(down)  # logged, never raised
        await down.aclose()
    asyncio.run(fail())
    assert buf.pending() == 10
    assert "trace: 1 events not kept (more than 10 waited for a flush)" in caplog.text
    assert "trace: 10 events not written (kept for the next flush)" in caplog.text
    buf.flush(r)
    assert buf.pending() == 0
    assert [bool(trace.message(r, f"B{i}")) for i in range(11)] == [True] * 10 + [False]


def test_events_without_a_message_are_not_traced(r: redis.Redis) -> None:
    buf = TraceBuffer(3600, "webmail")
    buf.event("login", {"id": None, "user": ALICE, "ip": "127.0.0.3"})
    buf.event("rejected", {"id": "-", "to": "-", "outcome": "421"})
    assert buf.pending() == 0


def test_retention_sets_the_ttl_and_zero_turns_the_trace_off(r: redis.Redis, settings: Settings) -> None:
    hour = load_settings({"redis_url": settings.redis_url, "trace_retention": "1h"}, env={})
    assert hour.trace_retention == 3600
    buf = TraceBuffer.for_settings(hour, "intake")
    assert buf is not None
    buf.event("received", {"id": "T1", "from": SENDER, "to": ALICE})
    buf.flush(r)
    assert 3590 <= (trace.ttl(r, "T1") or 0) <= 3600
    assert 3_590_000 <= r.pttl(keys.trace_address(ALICE)) <= 3_600_000
    assert load_settings({}, env={}).trace_retention == 14 * 86400
    off = load_settings({"trace_retention": "0"}, env={})
    assert TraceBuffer.for_settings(off, "intake") is None
    assert metrics.Counters(trace=TraceBuffer.for_settings(off, "intake")).trace is None
    # (Its refusals are in tests/test_config.py's table of bad settings.)


# --- the CLI's answers to bad input -------------------------------------------------------

def test_unknown_id_and_bad_arguments_get_one_line(r: redis.Redis, settings: Settings,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--redis-url", settings.redis_url or ""]
    cases = [
        (["trace", "01NOSUCHMESSAGE"], "fallback trace: no trace of message 01NOSUCHMESSAGE (an unknown "
         "id, or its trace is older than trace_retention)"),
        (["trace"], "fallback trace: give a message ID or --address ADDR, not both"),
        (["trace", "X", "--address", ALICE], "fallback trace: give a message ID or --address ADDR, not both"),
        (["trace", "X", "--since", "1h"], "fallback trace: --since lists an address's messages: give "
         "--address ADDR with it"),
        (["trace", "--address", ALICE, "--since", "soon"], "fallback trace: --since: not a duration: "
         "'soon' (use e.g. 60, 90s, 10m, 5d)"),
        (["trace", "--address", "not-an-address"], "fallback trace: --address: not an email address: "
         "'not-an-address'"),
        (["trace", "--address", ALICE, "--limit", "0"], "fallback trace: --limit must be greater than 0"),
    ]
    for argv, line in cases:
        code, out, err = run_cli(capsys, *argv, *url)
        assert (code, out, err) == (1, "", line + "\n"), argv
    code, out, _ = run_cli(capsys, "trace", "--address", ALICE, "--format", "json", *url)
    assert code == 0 and json.loads(out) == []


def test_mail_sent_from_the_webmail_is_traced(client: Any, r: redis.Redis) -> None:
    from tests.test_web_compose import send
    from tests.webutil import log_in_as

    log_in_as(client, ALICE)
    resp, msg_id = send(client, to="bob@example.com, x@remote.test", subject="from the webmail", body="hi")
    assert resp.status_code == 302
    client.application.extensions["fallback"].counters.flush(r)  # as after a request, when due
    evs = events_of(r, msg_id)
    assert {e["component"] for e in evs} == {"webmail"}
    assert {(e["event"], e.get("to"), e.get("via")) for e in evs} >= {("queued", "x@remote.test", "webmail")}
    assert any(e.get("to") == BOB for e in evs)
    assert all(e["from"] == ALICE for e in evs)
    assert [m["id"] for m in trace.recent(r, ALICE)] == [msg_id]
