"""Issue 17's cheaper connections: the protocol factory, the EHLO reply in one write, the
remembered clients.

smtpd_adapter.ProtocolFactory makes each connection's FallbackSMTP as a copy of a template
instead of through aiosmtpd's constructor: the copy must hold exactly the state the
constructor gives (compared field by field, with nothing mutable shared between
connections), and connections made so must keep their transactions apart on the real
receiver.  The EHLO reply, gathered into one write, must be word for word what stock
aiosmtpd answers with the same settings.  ClientLimits.client remembers who an address
is, up to MAX_CLIENTS addresses.
"""

from __future__ import annotations

import asyncio
import collections
import smtplib
import time
import types
import weakref
from dataclasses import replace
from typing import Any

import aiosmtpd.smtp
import redis

from fallback.config import Settings
from fallback.intake.clientlimits import ClientLimits, prefixes
from fallback.intake.receiver import ReceiverServer
from fallback.intake.smtpd_adapter import FallbackSMTP
from fallback.mailbox.store import MailboxReader
from fallback.redisconn import async_client
from tests.smtpwire import Wire

_OWN = (asyncio.StreamReader, asyncio.Future, weakref.ref, collections.deque)


def _shape(value: Any, owner: object) -> Any:
    """What can be compared across two instances: methods by function and by whether they are
    bound to their own instance, per-instance objects (reader, futures) by type."""
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, value.__self__ is owner)
    if isinstance(value, aiosmtpd.smtp._AuthMechAttr):
        return ("auth", _shape(value.method, owner), value.is_builtin)
    if isinstance(value, dict):
        return {k: _shape(v, owner) for k, v in value.items()}
    if isinstance(value, _OWN):
        return ("own", type(value))
    return value


def _mutable(value: Any) -> bool:
    return isinstance(value, (dict, list, set, *_OWN))


async def _made(settings: Settings) -> tuple[FallbackSMTP, FallbackSMTP, FallbackSMTP]:
    r = async_client(settings.redis_url or "")
    try:
        server = ReceiverServer(settings, r, 16)
        return server._protocol(), server.protocols(), server.protocols()
    finally:
        await r.aclose()


def test_factory_gives_the_state_aiosmtpds_constructor_gives(settings: Settings) -> None:
    direct, first, second = asyncio.run(_made(settings))
    assert sorted(vars(first)) == sorted(vars(direct))
    mismatched = {k: (_shape(v, first), _shape(vars(direct)[k], direct))
                  for k, v in vars(first).items() if _shape(v, first) != _shape(vars(direct)[k], direct)}
    assert mismatched == {}
    assert first._smtp_methods["EHLO"].__self__ is first
    assert all(m.method.__self__ is first for m in first._auth_methods.values() if m.is_builtin)
    shared = sorted(k for k, v in vars(first).items() if _mutable(v) and v is vars(second)[k])
    assert shared == [], f"connections would share {shared}"
    assert first._stream_reader is not second._stream_reader is not None  # type: ignore[attr-defined]


def test_connections_from_the_factory_keep_their_own_transactions(
        receiver: Any, r: redis.Redis, mailboxes: list[str]) -> None:
    alice, bob = mailboxes[0], mailboxes[1]
    one = smtplib.SMTP("127.0.0.1", receiver.port, source_address=("127.0.0.2", 0), timeout=10)
    two = smtplib.SMTP("127.0.0.1", receiver.port, source_address=("127.0.0.3", 0), timeout=10)
    try:
        assert one.ehlo("one.test")[0] == 250
        assert one.mail("first@remote.test")[0] == 250
        # A whole transaction on the second connection while the first is in the middle of its own.
        assert two.ehlo("two.test")[0] == 250
        assert two.mail("second@remote.test")[0] == 250
        assert two.rcpt(bob)[0] == 250
        assert two.data(b"Subject: two\r\n\r\nfrom the second\r\n")[0] == 250
        assert one.rcpt(alice)[0] == 250
        assert one.data(b"Subject: one\r\n\r\nfrom the first\r\n")[0] == 250
    finally:
        one.quit()
        two.quit()
    got = {}
    for addr in (alice, bob):
        reader = MailboxReader(r, addr)
        ids = reader.ids("INBOX")
        got[addr] = [reader.raw(i) or b"" for i in ids]
    assert [len(v) for v in got.values()] == [1, 1]
    assert b"from the first" in got[alice][0] and b"127.0.0.2" in got[alice][0]
    assert b"from the second" in got[bob][0] and b"127.0.0.3" in got[bob][0]
    assert b"two.test" in got[bob][0] and b"one.test" in got[alice][0]


async def _stock_ehlo(settings: Settings, hostname: str) -> list[str]:
    """aiosmtpd's own EHLO reply with the receiver's settings."""

    class Handler:
        async def handle_DATA(self, *_: object) -> str:
            return "250 OK"

    server = await asyncio.get_running_loop().create_server(
        lambda: aiosmtpd.smtp.SMTP(Handler(), hostname=hostname, data_size_limit=settings.max_message_size,
                                   enable_SMTPUTF8=True), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        lines = [(await reader.readline()).decode().rstrip("\r\n")]
        while lines[-1][3:4] == "-":
            lines.append((await reader.readline()).decode().rstrip("\r\n"))
        return lines
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


def test_ehlo_reply_is_aiosmtpds_own(receiver: Any, settings: Settings) -> None:
    stock = asyncio.run(asyncio.wait_for(_stock_ehlo(settings, "fallback.test"), 10))
    wire = Wire(receiver.port)
    wire.expect("220")
    wire.cmd("EHLO client.test")
    assert wire.expect("250") == stock
    assert "250-SIZE" in " ".join(stock) and stock[-1] == "250 HELP"
    wire.cmd("EHLO")  # the refusal is gathered and written too
    assert wire.expect("501") == ["501 Syntax: EHLO hostname"]
    wire.cmd("HELP EHLO")  # our smtp_EHLO keeps aiosmtpd's help text
    assert wire.expect("250") == ["250 Syntax: EHLO hostname"]
    wire.cmd("EHLO again.test")  # a second EHLO on the same connection: the same reply
    assert wire.expect("250") == stock
    wire.cmd("QUIT")
    wire.expect("221")


def test_clients_are_remembered_up_to_the_limit(settings: Settings) -> None:
    limits = ClientLimits(replace(settings, trusted_relays="192.0.2.0/24"))
    limits.MAX_CLIENTS = 3
    first = limits.client("203.0.113.7")
    assert limits.client("203.0.113.7") is first
    assert first.prefixes == prefixes("203.0.113.7") == ("203.0.113.7/32", "203.0.113.0/24")
    assert limits.client("192.0.2.9").trusted and not first.trusted
    at_limit = limits.client("2001:db8::1")  # the third: the limit
    assert len(limits._clients) == 3 and at_limit.prefixes == ("2001:db8::/64",)
    past = limits.client("198.51.100.1")  # one past it: the others are forgotten, not it
    assert len(limits._clients) == 1 and limits.client("198.51.100.1") is past
    again = limits.client("203.0.113.7")  # worked out again, the same answer
    assert again == first and again is not first
    assert limits.client("192.0.2.9").trusted


def test_connection_deadline_holds_for_a_client_that_keeps_making_progress(
        receiver_factory: Any, mailboxes: list[str]) -> None:
    """The one timer keeps both times: progress restarts the idle time, never the connection's."""
    rt = receiver_factory(idle_timeout=0.5, connection_timeout=1.5)
    wire = Wire(rt.port)
    wire.expect("220")
    wire.cmd("EHLO client.test")
    wire.expect("250")
    wire.cmd("MAIL FROM:<s@remote.test>")
    wire.expect("250")
    replies = []
    for _ in range(100):  # an RCPT every 0.2 s: each one is progress, well within the idle time
        wire.cmd(f"RCPT TO:<{mailboxes[0]}>")
        reply = wire.reply()
        replies.append(reply)
        if reply is None or reply[0].startswith("421"):
            break
        time.sleep(0.2)
    assert replies[0] == ["250 2.1.5 Recipient OK"]
    assert replies[-1] == ["421 4.4.2 Connection time limit exceeded, closing"]
    assert wire.closed()
