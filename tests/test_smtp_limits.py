"""Per-client SMTP limits (issue 13, item 5) against the real receiver and redis-server:
prefixes (/32 and /24, /64), trusted relays, the per-prefix message rate, connections that
only idle, slow DATA, and the shorter idle time under stress.

Clients connect from several loopback addresses: 127.0.0.2 and 127.0.0.3 share a /24,
127.0.1.2 is in another; ::1 is an IPv6 client.  Every test also checks that what got 250
is stored and what did not is not.
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import socket
import time
from dataclasses import replace
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.config import Settings, load_settings
from fallback.errors import ConfigError
from fallback.intake.clientlimits import NETWORK_FACTOR, ClientLimits, prefixes
from fallback.intake.receiver import ReceiverServer
from fallback.mailbox import directory
from fallback.mailbox.store import MailboxReader
from fallback.maillog import LOGGER_NAME, MailLog
from fallback.ops import metrics
from fallback.redisconn import async_client
from tests.conftest import ReceiverThread
from tests.servers import RedisClusterServers, free_port, wait_for
from tests.smtpwire import Wire
from tests.test_smtp_protocol import _greeting

RATE_REPLY = (451, b"4.7.1 Too many messages from your network, try again later")
CAP_REPLY = b"421 4.7.0 Too many connections, try again later\r\n"
IDLE_REPLY = "421 4.4.2 Idle time limit exceeded, closing"
SLOW_REPLY = "421 4.4.2 Data too slow, closing"


def subjects(r: redis.Redis, address: str = "alice@example.com") -> list[str]:
    found = []
    for _, _, raw in MailboxReader(r, address).iter_messages():
        m = re.search(rb"^Subject: (.*?)\r$", raw, re.M)
        assert m, raw[:200]
        found.append(m.group(1).decode())
    return sorted(found)


def connect(port: int, source: str, host: str = "127.0.0.1") -> smtplib.SMTP:
    smtp = smtplib.SMTP(host, port, source_address=(source, 0), timeout=10)
    smtp.ehlo("client.remote.test")
    return smtp


def send(smtp: smtplib.SMTP, subject: str) -> tuple[int, bytes]:
    """One message to alice: (250, b"") when stored, else the refusal at MAIL FROM."""
    try:
        smtp.sendmail("s@remote.test", ["alice@example.com"],
                      f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
    except smtplib.SMTPSenderRefused as exc:
        return exc.smtp_code, exc.smtp_error
    return 250, b""


def mail_log(caplog: pytest.LogCaptureFixture, event: str = "rejected") -> list[str]:
    return [rec.getMessage() for rec in caplog.records
            if rec.name == LOGGER_NAME and rec.getMessage().startswith(f"event={event} ")]


def greeting(port: int, source: str, host: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
    s = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    return s, _greeting(s)


# --- who a client is -------------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "expected"), [
    ("203.0.113.7", ("203.0.113.7/32", "203.0.113.0/24")),
    ("::ffff:203.0.113.7", ("203.0.113.7/32", "203.0.113.0/24")),   # IPv4-mapped counts as IPv4
    ("2001:db8:1:2:aaaa::1", ("2001:db8:1:2::/64",)),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", ("2001:db8:1:2::/64",)),  # same /64: the same client
    ("2001:db8:1:3::1", ("2001:db8:1:3::/64",)),
    ("fe80::1%eth0", ("fe80::/64",)),                               # the scope is not the network
    ("::1", ("::/64",)),
    ("unknown", ("unknown",)),                                       # not an IP: its own client
])
def test_prefixes(ip: str, expected: tuple[str, ...]) -> None:
    assert prefixes(ip) == expected


def test_trusted_relays_and_allowances(settings: Settings) -> None:
    limits = ClientLimits(replace(settings, trusted_relays="192.0.2.0/28, 2001:db8::/64"))
    assert limits.client("192.0.2.15").trusted
    assert limits.client("::ffff:192.0.2.1").trusted
    assert limits.client("2001:db8::25").trusted
    assert not limits.client("192.0.2.16").trusted
    assert not limits.client("2001:db8:0:1::1").trusted
    assert not limits.client("unknown").trusted
    assert limits.client("198.51.100.1").allowances(20) == (20, 20 * NETWORK_FACTOR)
    assert limits.client("2001:db8:5::1").allowances(20) == (20,)


def test_settings_of_the_slow_client_limits(settings: Settings) -> None:
    s = load_settings({"stress_idle_timeout": "5", "min_data_rate": "1KiB"}, env={})
    assert (s.stress_idle_timeout, s.min_data_rate) == (5.0, 1024)
    defaults = load_settings({}, env={})
    assert (defaults.stress_idle_timeout, defaults.min_data_rate) == (10.0, 500)
    with pytest.raises(ConfigError, match=r"^stress_idle_timeout: must be greater than 0$"):
        load_settings({"stress_idle_timeout": "0"}, env={})
    with pytest.raises(ConfigError) as bad:
        load_settings({"min_data_rate": "-1"}, env={})
    assert str(bad.value) == "--min-data-rate: not a size: '-1' (use e.g. 52428800, 50MiB, 512KiB)"
    assert load_settings({"min_data_rate": "0"}, env={}).min_data_rate == 0  # no minimum
    # The stress timeout never lengthens the normal one.
    assert ClientLimits(replace(settings, idle_timeout=3.0)).stress_idle_timeout == 3.0


# --- the message rate, counted in Redis ------------------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _rate(settings: Settings, per_minute: int, clock: Clock, calls: list[str],
          trusted: str | None = None) -> list[str | None]:
    """One receiver process's ClientLimits on a real async client: for each ip in `calls`
    a MAIL FROM judged (over_message_rate) and, when let through, its message counted; then
    the counts flushed to Redis, as at shutdown."""
    async def run() -> list[str | None]:
        client = async_client(settings.redis_url or "")
        limits = ClientLimits(replace(settings, max_messages_per_ip_per_minute=per_minute,
                                      trusted_relays=trusted), client, clock=clock)
        out = []
        try:
            for ip in calls:
                out.append(await limits.over_message_rate(limits.client(ip)))
                if out[-1] is None:
                    limits.count_message(limits.client(ip))
            await limits.aclose()
        finally:
            await client.aclose()
        return out
    return asyncio.run(run())


def test_rate_at_the_limit_and_one_past(settings: Settings, r: redis.Redis) -> None:
    clock = Clock(1_000_020.0)  # 20 s into a minute
    got = _rate(settings, 3, clock, ["198.51.100.1"] * 4 + ["198.51.100.2"])
    assert got == [None, None, None, "198.51.100.1/32", None]
    # Refusals are not counted: the /32 holds 3, the /24 4.
    minute = int(clock.now // 60)
    assert r.get(keys.smtp_rate("198.51.100.1/32", minute)) == b"3"
    assert r.get(keys.smtp_rate("198.51.100.0/24", minute)) == b"4"
    assert 0 < r.pttl(keys.smtp_rate("198.51.100.1/32", minute)) <= 120_000


def test_rate_of_the_24_is_four_times_the_hosts(settings: Settings, r: redis.Redis) -> None:
    clock = Clock(2_000_000.0)
    hosts = [f"198.51.100.{n}" for n in range(1, 5)]  # 4 hosts x 2 = the /24's 8
    got = _rate(settings, 2, clock, [h for h in hosts for _ in range(2)]
                + ["198.51.100.9", "198.51.101.1", "2001:db8::1", "2001:db8::2", "2001:db8::3"])
    assert got[:8] == [None] * 8
    assert got[8] == "198.51.100.0/24"        # a fifth host of the full /24
    assert got[9] is None                      # another /24
    assert got[10:] == [None, None, "2001:db8::/64"]  # any address of the /64 is the same client


def test_rate_window_slides_over_the_minute_boundary(settings: Settings, r: redis.Redis) -> None:
    clock = Clock(3_000_000.0 - 6)  # 6 s before a minute starts
    assert _rate(settings, 4, clock, ["198.51.100.1"] * 4) == [None] * 4
    # 15 s later (a quarter into the new minute): 3/4 of the 4 still count, so 1 more fits.
    clock.now = 3_000_000.0 + 15
    assert _rate(settings, 4, clock, ["198.51.100.1"] * 2) == [None, "198.51.100.1/32"]
    # Half way into the minute after, the one message of the minute before weighs 1/2: 3 fit.
    clock.now = 3_000_000.0 + 90
    assert _rate(settings, 4, clock, ["198.51.100.1"] * 4) == [None] * 3 + ["198.51.100.1/32"]
    # Two minutes after it, nothing weighs: the whole allowance.
    clock.now = 3_000_000.0 + 180
    assert _rate(settings, 4, clock, ["198.51.100.1"] * 5) == [None] * 4 + ["198.51.100.1/32"]


def test_rate_on_a_redis_cluster(settings: Settings, tmp_path: Any) -> None:
    # The keys of one client's prefixes live in different slots: one pipeline still counts them.
    cluster = RedisClusterServers(tmp_path / "cluster", replicas=0).start()
    try:
        on_cluster = replace(settings, redis_url=cluster.url)
        clock = Clock(6_000_000.0)
        hosts = ["198.51.100.1", "198.51.100.2"]
        assert _rate(on_cluster, 2, clock, hosts * 2) == [None] * 4
        # A second process hears of them from the cluster: both hosts at 2 of 2, the /24 at 4 of 8.
        assert _rate(on_cluster, 2, clock, hosts + ["198.51.100.3"] * 3) == (
            ["198.51.100.1/32", "198.51.100.2/32", None, None, "198.51.100.3/32"])
        # A third: the /24 at 6 of 8.
        assert _rate(on_cluster, 2, clock, ["198.51.100.4"] * 2 + ["198.51.100.5"]) == (
            [None, None, "198.51.100.0/24"])
    finally:
        cluster.stop()


def test_rate_memory_is_bounded_and_forgets_nothing_redis_holds(settings: Settings, r: redis.Redis) -> None:
    async def run() -> tuple[list[str | None], int]:
        client = async_client(settings.redis_url or "")
        limits = ClientLimits(replace(settings, max_messages_per_ip_per_minute=2), client,
                              clock=Clock(7_000_000.0))
        limits.MAX_SEEN = 6
        try:
            first = limits.client("198.51.100.1")
            assert await limits.over_message_rate(first) is None
            limits.count_message(first)
            await limits.flush()
            for n in range(10):  # ten other networks crowd it out of memory
                other = limits.client(f"203.0.{n}.1")
                assert await limits.over_message_rate(other) is None
                limits.count_message(other)
            remembered = len(limits._seen)
            out = []
            for _ in range(2):  # read back from Redis: one more fits, then it is over
                out.append(await limits.over_message_rate(first))
                if out[-1] is None:
                    limits.count_message(first)
            await limits.aclose()
        finally:
            await client.aclose()
        return out, remembered
    out, remembered = asyncio.run(run())
    assert remembered <= 6 + 2
    assert out == [None, "198.51.100.1/32"]


def test_rate_exempts_trusted_relays_and_zero_lifts_it(settings: Settings, r: redis.Redis) -> None:
    clock = Clock(4_000_000.0)
    assert _rate(settings, 1, clock, ["192.0.2.1"] * 5, trusted="192.0.2.0/28") == [None] * 5
    assert _rate(settings, 0, clock, ["198.51.100.1"] * 5) == [None] * 5
    assert r.keys("smtprate:*") == []  # neither is even counted


def test_rate_without_redis_is_counted_by_the_process_alone(settings: Settings,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    dead = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    caplog.set_level(logging.WARNING, logger="fallback.intake.clientlimits")
    # The first message goes ahead (its write will meet the same trouble and answer 4xx);
    # what the process counted itself still holds.
    assert _rate(dead, 1, Clock(5_000_000.0), ["198.51.100.1"] * 3) == [None] + ["198.51.100.1/32"] * 2
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "fallback.intake.clientlimits"]
    assert len(warnings) == 1, warnings  # once, not once per message
    assert warnings[0].startswith("message rate not counted (from 198.51.100.1 on, until Redis answers)")


# --- the message rate on the wire ------------------------------------------------------------

class CountingReceiver(ReceiverThread):
    """The real receiver with its mail log counted, as `fallback up` counts it for /metrics."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.counters = metrics.Counters()
        self.maillog = MailLog(counters=metrics.MailCounters(self.counters))

    async def _start(self) -> int:
        r = async_client(self.settings.redis_url or "")
        buckets = await directory.ensure_buckets_async(r, self.settings.directory_buckets)
        self.server = ReceiverServer(self.settings, r, buckets, maillog=self.maillog)
        return await self.server.start()


def test_message_rate_per_host_and_per_24(settings: Settings, r: redis.Redis, mailboxes: list[str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    rt = CountingReceiver(replace(settings, max_messages_per_ip_per_minute=2))
    rt.start()
    try:
        outcomes: dict[str, list[Any]] = {}
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.1.2"):
            with connect(rt.port, host) as smtp:
                outcomes[host] = [send(smtp, f"{host} #{n}") for n in range(3)]
                assert smtp.noop()[0] == 250  # a refused MAIL leaves the session usable
    finally:
        rt.stop()
    ok = (250, b"")
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
        assert outcomes[host] == [ok, ok, RATE_REPLY], host       # at the /32 limit, one past it
    assert outcomes["127.0.0.6"] == [RATE_REPLY] * 3             # the /24 has sent its 2 x 4
    assert outcomes["127.0.1.2"] == [ok, ok, RATE_REPLY]         # another /24 is not affected
    accepted = sorted(f"{h} #{n}" for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5",
                                            "127.0.1.2") for n in range(2))
    assert subjects(r) == accepted                                # every 250 is stored, nothing else
    lines = mail_log(caplog)
    assert len(lines) == 8, lines
    assert all('outcome="451 4.7.1"' in ln for ln in lines)
    assert any("peer=127.0.0.2 " in ln and 'reason="127.0.0.2/32 over 2 messages a minute"' in ln
               for ln in lines), lines
    assert sum("peer=127.0.0.6 " in ln and 'reason="127.0.0.0/24 over 8 messages a minute"' in ln
               for ln in lines) == 3, lines
    rt.counters.flush(r)
    counted = metrics.totals(r)[metrics.MAIL_EVENTS]
    assert counted[(("event", "rejected"), ("outcome", "451"))] == 8
    assert counted[(("event", "received"), ("outcome", "250"))] == 10


def test_message_rate_is_shared_by_receiver_processes(receiver_factory: Any, r: redis.Redis,
                                                      mailboxes: list[str]) -> None:
    # Two receivers on one Redis (as `--smtp-workers` or several machines): one allowance.
    first, second = (receiver_factory(max_messages_per_ip_per_minute=2) for _ in range(2))
    with connect(first.port, "127.0.0.2") as a:
        assert [send(a, "one"), send(a, "two"), send(a, "three")] == [(250, b""), (250, b""), RATE_REPLY]
    # Within ClientLimits.FLUSH_INTERVAL the first receiver has added its count in Redis ...
    minute = int(time.time() // 60)
    wait_for(lambda: sum(int(r.get(keys.smtp_rate("127.0.0.2/32", m)) or 0)
                         for m in (minute, minute + 1)) == 2, 10, "the first receiver's count in Redis")
    # ... and the client moving to the other receiver is refused there at once.
    with connect(second.port, "127.0.0.2") as b:
        assert send(b, "four") == RATE_REPLY
    assert subjects(r) == ["one", "two"]


def test_trusted_relay_is_exempt_from_rate_and_per_client_caps(
        receiver_factory: Any, r: redis.Redis, mailboxes: list[str]) -> None:
    rt = receiver_factory(max_messages_per_ip_per_minute=1, max_connections_per_ip=1,
                          max_connections=4, trusted_relays="127.0.0.2/32")
    with connect(rt.port, "127.0.0.2") as relay:
        assert [send(relay, f"relayed {n}") for n in range(4)] == [(250, b"")] * 4
    with connect(rt.port, "127.0.0.3") as other:  # same /24, not trusted
        assert [send(other, "other 0"), send(other, "other 1")] == [(250, b""), RATE_REPLY]
    assert rt.server is not None
    wait_for(lambda: not rt.server.tracker.connections, 10, "the receiver to see both QUITs")
    held = [greeting(rt.port, "127.0.0.2") for _ in range(4)]
    assert [g for _, g in held] == [b"220 fallback.test fallback ESMTP\r\n"] * 4  # past the per-IP 1
    extra, reply = greeting(rt.port, "127.0.0.2")
    assert reply == CAP_REPLY        # but not past the total cap
    for s, _ in [*held, (extra, b"")]:
        s.close()
    assert subjects(r) == ["other 0"] + [f"relayed {n}" for n in range(4)]


# --- connection caps by prefix ---------------------------------------------------------------

def test_connection_cap_per_host_and_per_24(receiver_factory: Any, mailboxes: list[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    rt = receiver_factory(max_connections=100, max_connections_per_ip=2)
    held = []
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
        for _ in range(2):  # at the limit
            s, reply = greeting(rt.port, host)
            held.append(s)
            assert reply.startswith(b"220 "), (host, reply)
    past_host, reply = greeting(rt.port, "127.0.0.2")
    assert reply == CAP_REPLY and past_host.recv(1) == b""  # one past: refused and closed
    past_net, reply = greeting(rt.port, "127.0.0.6")       # a new host of the full /24
    assert reply == CAP_REPLY
    other, reply = greeting(rt.port, "127.0.1.2")          # another /24
    assert reply.startswith(b"220 ")
    lines = mail_log(caplog)
    assert any('outcome="421 4.7.0"' in ln and "peer=127.0.0.2 " in ln
               and "127.0.0.2/32 holds 2 of 2 connections" in ln for ln in lines), lines
    assert any("peer=127.0.0.6 " in ln and "127.0.0.0/24 holds 8 of 8 connections" in ln
               for ln in lines), lines
    # A slot given back is free again.
    held.pop(0).close()
    for _ in range(100):  # bounded: the server sees the close a moment later
        s, reply = greeting(rt.port, "127.0.0.2")
        s.close()
        if reply.startswith(b"220"):
            break
        time.sleep(0.05)
    assert reply.startswith(b"220 ")
    for s in [*held, past_host, past_net, other]:
        s.close()


def test_ipv6_client_is_its_64(receiver_factory: Any, r: redis.Redis, mailboxes: list[str],
                               caplog: pytest.LogCaptureFixture) -> None:
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here (the /64 is unit-tested in test_prefixes)")
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    rt = receiver_factory(smtp_host="::1", max_connections_per_ip=1, max_messages_per_ip_per_minute=1)
    with smtplib.SMTP("::1", rt.port, timeout=10) as smtp:
        smtp.ehlo("client.remote.test")
        s, reply = greeting(rt.port, "::1", host="::1")
        assert reply == CAP_REPLY  # one past the cap of one
        s.close()
        assert [send(smtp, "v6 0"), send(smtp, "v6 1")] == [(250, b""), RATE_REPLY]
    assert subjects(r) == ["v6 0"]
    assert any('reason="::/64 over 1 messages a minute"' in ln for ln in mail_log(caplog))


# --- idle and slow clients -------------------------------------------------------------------

def _until_closed(wire: Wire, step: Any, times: int) -> tuple[int, list[str]]:
    """Run step(n) up to `times` times; (steps run, last reply) once the server closes."""
    for n in range(times):
        try:
            step(n)
        except OSError:
            return n, []
        got = wire.reply()
        if got is None or got[-1].startswith("421"):
            return n, got or []
    return times, []


def test_only_noop_and_rset_is_idle(receiver_factory: Any, r: redis.Redis, mailboxes: list[str],
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    rt = receiver_factory(idle_timeout=1.0, connection_timeout=60)
    wire = Wire(rt.port)
    wire.expect("220")
    wire.cmd("EHLO client.remote.test")
    wire.expect("250")
    chatter = ["NOOP", "RSET", "HELP", "VRFY alice@example.com", "EXPN staff", "EHLO again.test",
               "HELO again.test"]

    def step(n: int) -> None:
        time.sleep(0.25)
        wire.cmd(chatter[n % len(chatter)])

    # Before, each of these restarted the idle timer: 40 of them kept the connection for 10 s.
    steps, last = _until_closed(wire, step, 40)
    assert steps < 40, "the connection outlived its idle time on commands that do nothing"
    assert last == [IDLE_REPLY]
    assert wire.closed()
    assert any('outcome="421 4.4.2"' in ln and "peer=127.0.0.1 " in ln and "no progress" in ln
               for ln in mail_log(caplog)), mail_log(caplog)


def test_progress_keeps_a_connection_past_the_idle_time(receiver_factory: Any, r: redis.Redis,
                                                        mailboxes: list[str]) -> None:
    rt = receiver_factory(idle_timeout=2.0, connection_timeout=60)
    wire = Wire(rt.port)
    wire.expect("220")
    wire.cmd("EHLO client.remote.test")
    wire.expect("250")
    # Each command comes within the idle time of the one before; all together take longer.
    for cmd, code in (("MAIL FROM:<s@remote.test>", "250"), ("RCPT TO:<alice@example.com>", "250"),
                      ("RCPT TO:<bob@example.com>", "250"), ("DATA", "354")):
        time.sleep(0.8)
        wire.cmd(cmd)
        wire.expect(code)
    time.sleep(0.8)
    wire.send(b"Subject: patient\r\n\r\nslow but steady\r\n.\r\n")
    wire.expect("250")
    wire.cmd("QUIT")
    wire.expect("221")
    assert subjects(r) == ["patient"] and subjects(r, "bob@example.com") == ["patient"]


def in_data(port: int) -> Wire:
    """A connection to `port` that has sent MAIL, RCPT (alice) and DATA, and got its 354."""
    wire = Wire(port)
    wire.expect("220")
    for command, reply in (("EHLO client.remote.test", "250"), ("MAIL FROM:<s@remote.test>", "250"),
                           ("RCPT TO:<alice@example.com>", "250"), ("DATA", "354")):
        wire.cmd(command)
        wire.expect(reply)
    return wire


def test_data_below_the_minimum_rate_is_cut(receiver_factory: Any, r: redis.Redis, mailboxes: list[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    rt = receiver_factory(idle_timeout=1.0, min_data_rate=1000, connection_timeout=60)
    wire = in_data(rt.port)
    wire.send(b"Subject: dribble\r\n\r\n")

    def step(n: int) -> None:  # one byte every 0.2 s: 5 bytes/s, far below 1000
        time.sleep(0.2)
        wire.send(b"x")

    wire.sock.settimeout(0.05)
    closed = None
    for n in range(60):  # bounded: 12 s of dribbling at most
        try:
            step(n)
        except OSError:
            break
        try:
            closed = wire.reply()
        except TimeoutError:
            continue
        break
    wire.sock.settimeout(10)
    assert closed == [SLOW_REPLY]
    assert wire.closed()
    assert subjects(r) == []  # nothing was accepted, nothing stored
    assert any('outcome="421 4.4.2"' in ln and "to=alice@example.com" in ln and "under 1000 bytes/s" in ln
               for ln in mail_log(caplog)), mail_log(caplog)


def test_data_at_the_minimum_rate_may_take_longer_than_the_idle_time(
        receiver_factory: Any, r: redis.Redis, mailboxes: list[str]) -> None:
    rt = receiver_factory(idle_timeout=1.0, min_data_rate=1000, connection_timeout=60)
    wire = in_data(rt.port)
    body = b"Subject: steady\r\n\r\n"
    wire.send(body)
    line = b"y" * 998 + b"\r\n"
    for _ in range(12):  # 3 s in all, 8000 bytes/s: over the 1 s idle time, above the rate
        time.sleep(0.25)
        wire.send(line * 2)
        body += line * 2
    wire.send(b".\r\n")
    wire.expect("250")
    stored = [raw for _, _, raw in MailboxReader(r, "alice@example.com").iter_messages()]
    assert len(stored) == 1 and stored[0].endswith(body)


def test_under_stress_idle_clients_get_the_short_timeout(receiver_factory: Any, r: redis.Redis,
                                                         mailboxes: list[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    # Stress from 4 of 5 connections (80 %); idle clients then get 1 s instead of 60 s.
    rt = receiver_factory(max_connections=5, max_connections_per_ip=10, idle_timeout=60.0,
                          stress_idle_timeout=1.0, connection_timeout=120)
    idle = [Wire(rt.port) for _ in range(3)]
    for w in idle:
        w.expect("220")
        w.cmd("EHLO idle.remote.test")
        w.expect("250")
    time.sleep(1.5)  # longer than the stress timeout: not under stress, so still connected
    for w in idle:
        w.cmd("NOOP")
        w.expect("250")
    # The fourth connection brings stress: the idle ones are closed, it can still send.
    sender = Wire(rt.port)
    sender.expect("220")
    for w in idle:
        assert w.reply() == [IDLE_REPLY]
        assert w.closed()
    transaction = [("EHLO sender.remote.test", "250"), ("MAIL FROM:<s@remote.test>", "250"),
                   ("RCPT TO:<alice@example.com>", "250"), ("DATA", "354"),
                   ("Subject: under stress\r\n\r\nstill delivered\r\n.", "250"), ("QUIT", "221")]
    for cmd, code in transaction:
        sender.cmd(cmd)
        sender.expect(code)
    assert subjects(r) == ["under stress"]
    assert sum('outcome="421 4.4.2"' in ln for ln in mail_log(caplog)) == 3


def test_connection_time_limit_is_logged(receiver_factory: Any, mailboxes: list[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    rt = receiver_factory(connection_timeout=1.0, idle_timeout=60.0)
    wire = Wire(rt.port)
    wire.expect("220")
    wire.cmd("EHLO client.remote.test")
    wire.expect("250")
    assert wire.reply() == ["421 4.4.2 Connection time limit exceeded, closing"]
    assert wire.closed()
    assert any('outcome="421 4.4.2"' in ln and 'reason="connected for 1s"' in ln for ln in mail_log(caplog))
