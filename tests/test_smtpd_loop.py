"""smtpd_loop.LeanSMTP answers every command byte for byte as stock aiosmtpd does.

Two servers run side by side on 127.0.0.1 in one event loop, aiosmtpd's own
`SMTP` and `LeanSMTP`, built with the same keyword arguments (several settings:
SMTPUTF8 on and off, no size limit, a small command_call_limit, decode_data,
a local-part limit) and each with its own instance of the same handler (hooks
for MAIL/RCPT/DATA, DATA only, or hooks for EHLO/NOOP/RSET/QUIT).  The same
dialogues, errors and odd syntax included, go to both: line by line, with the
whole reply read after each line, and pipelined in one write with every reply
read to the end.  The replies must be the same bytes, and so must what the
handler hooks were called with (DATA's content included); only where a
pipelined dialogue goes on after the server has closed may LeanSMTP make
fewer of those calls than aiosmtpd (never others, never more).
"""

from __future__ import annotations

import asyncio
import pprint
import socket
from collections.abc import Callable
from typing import Any

import aiosmtpd.smtp
import pytest
import uvloop

from fallback.intake.smtpd_loop import DRAIN_AT, LeanSMTP

READ_TIMEOUT = 5
REFUSED = "refused@y.test"

# --- handlers: each records what its hooks were called with -------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.calls.append(("DATA", session.host_name, envelope.mail_from, list(envelope.mail_options),
                           envelope.smtp_utf8, list(envelope.rcpt_tos), list(envelope.rcpt_options),
                           envelope.content, envelope.original_content))
        return "250 2.0.0 stored"


class Hooked(Recorder):
    """MAIL and RCPT hooks (what the receiver has): LeanSMTP's MAIL/RCPT fast paths are on."""

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.calls.append(("MAIL", address, list(options), envelope.smtp_utf8))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.calls.append(("RCPT", address, list(options)))
        if address == REFUSED:
            return "550 5.1.1 no"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"


class DataOnly(Recorder):
    """No MAIL/RCPT hooks: aiosmtpd's MISSING path answers them (LeanSMTP delegates)."""


class OtherHooks(Recorder):
    """Hooks for the commands LeanSMTP would otherwise answer itself: it must delegate them."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        self.calls.append(("EHLO", hostname, list(responses)))
        session.host_name = hostname
        return [*responses[:-1], "250-X-HOOKED", responses[-1]]

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str | None) -> str:
        self.calls.append(("NOOP", arg))
        return "250 2.0.0 noop hook"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.calls.append(("RSET",))
        return "250 2.0.0 rset hook"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.calls.append(("QUIT",))
        return "221 2.0.0 quit hook"


HANDLERS: dict[str, Callable[[], Recorder]] = {"hooked": Hooked, "data-only": DataOnly,
                                               "other-hooks": OtherHooks}

BASE: dict[str, Any] = {"hostname": "same.test", "ident": "same ESMTP", "data_size_limit": 1000,
                        "enable_SMTPUTF8": True, "command_call_limit": 50}
CONFIGS: dict[str, dict[str, Any]] = {
    "smtputf8": BASE,
    "ascii": {**BASE, "enable_SMTPUTF8": False},
    "no-size-limit": {**BASE, "data_size_limit": None},
    "call-limit-3": {**BASE, "command_call_limit": 3},
    "no-call-limit": {**BASE, "command_call_limit": None},
    "decode-data": {**BASE, "decode_data": True},
    # Not a constructor argument: set on a subclass of each server (see _classes).
    "local-part-limit": {**BASE, "local_part_limit": 10},
}

# --- dialogues -----------------------------------------------------------------------
# Each item is one line sent with CRLF added, or, when it already ends in CRLF, sent as it is
# (a message after DATA's 354, with its final dot line).

EHLO = b"EHLO c.test"
HELO = b"HELO c.test"
MAIL = b"MAIL FROM:<a@b.test>"
RCPT = b"RCPT TO:<x@y.test>"
MESSAGE = b"Subject: hi\r\n\r\nline one\r\n..stuffed dot\r\n.\r\n"
MESSAGE_8BIT = b"Subject: \xc3\xa9t\xc3\xa9\r\n\r\n\xff raw\r\n.\r\n"
TAIL = [RCPT, b"DATA", MESSAGE]


def _long_mail(length: int) -> bytes:
    """MAIL FROM:<aaa…@b.test> of exactly `length` bytes."""
    return b"MAIL FROM:<" + b"a" * (length - len(b"MAIL FROM:<@b.test>")) + b"@b.test>"


MAIL_ARGS = [
    MAIL, MAIL + b" SIZE=10", MAIL + b" SIZE=1000", MAIL + b" SIZE=1001", MAIL + b" SIZE=100000",
    MAIL + b" SIZE=0", MAIL + b" SIZE=x", MAIL + b" SIZE=", MAIL + b" SIZE", MAIL + " SIZE=\u00b2".encode(),
    MAIL + " SIZE=\u0661\u0662".encode(), MAIL + b" BODY=8BITMIME", MAIL + b" BODY=7BIT",
    MAIL + b" BODY=BINARY", MAIL + b" BODY=", MAIL + b" SMTPUTF8", MAIL + b" SMTPUTF8=x", MAIL + b" FOO=1",
    MAIL + b" FOO", MAIL + b" =1", MAIL + b" SIZE=10 SIZE=20", MAIL + b" BODY=7BIT BODY=8BITMIME",
    MAIL + b" SMTPUTF8 SMTPUTF8", MAIL + b" SIZE=10 BODY=8BITMIME SMTPUTF8",
    MAIL + b" size=10 body=8bitmime smtputf8", MAIL + b"SIZE=10", MAIL + b"\tSIZE=10", MAIL + b"  SIZE=10  ",
    MAIL + b" SIZE=10 FOO=1", MAIL + b" (comment)", MAIL + b"(comment) SIZE=10", MAIL + b" \x0bSIZE=10",
    b"mail from:<a@b.test>", b"Mail From:<a@b.test>", b"MAIL FROM: <a@b.test>", b"MAIL  FROM:<a@b.test>",
    b"MAIL FROM:a@b.test", b"MAIL FROM:a@b.test SIZE=10", b"MAIL FROM:<>", b"MAIL FROM:<> SIZE=10",
    b'MAIL FROM:<"a b"@c.test>', b"MAIL FROM:<a..b@c.test>", b"MAIL FROM:<a.@b.test>",
    b"MAIL FROM:<@relay.test:a@b.test>", b"MAIL FROM:<a@[127.0.0.1]>", b"MAIL FROM:<A+Tag@B.TEST>",
    b"MAIL FROM:<a@b.test", b"MAIL FROM:<a@b.test>>", b"MAIL FROM:", b"MAIL FROM", b"MAIL",
    b"MAIL TO:<a@b.test>", b"MAIL FROM<a@b.test>", b"MAIL FROM:<\xff@b.test>",
    b"MAIL FROM:<\xc3\xa9@b.test> SMTPUTF8", b"MAIL FROM:<a@b.test> SIZE=\xff",
    b"MAIL FROM:<abcdefghijk@b.test>", b"MAIL FROM:<abcdefghij@b.test>",
]

RCPT_ARGS = [
    RCPT, RCPT + b" NOTIFY=NEVER", RCPT + b" FOO", RCPT + b" =x", f"RCPT TO:<{REFUSED}>".encode(),
    b"RCPT TO:", b"RCPT TO:<>", b"RCPT TO", b"RCPT", b"rcpt to:<x@y.test>", b"RCPT TO: <x@y.test>",
    b"RCPT TO:x@y.test", b"RCPT TO:<x@y.test> (c)", b"RCPT TO:<x@y.test>  ", b"RCPT FROM:<x@y.test>",
    b'RCPT TO:<"x y"@y.test>', b"RCPT TO:<\xff@y.test>", b"RCPT TO:<" + b"l" * 70 + b"@y.test>",
    b"RCPT TO:<abcdefghijk@y.test>", b"RCPT TO:<Postmaster>",
]

DIALOGUES: list[tuple[str, list[bytes]]] = [
    ("greeting", []),
    ("ehlo", [EHLO]), ("ehlo-lowercase", [b"ehlo c.test"]), ("ehlo-no-host", [b"EHLO"]),
    ("ehlo-space-only", [b"EHLO "]), ("ehlo-trailing-spaces", [b"EHLO c.test   "]),
    ("ehlo-leading-spaces", [b"EHLO   c.test"]), ("ehlo-two-words", [b"EHLO c.test x"]),
    ("ehlo-tab", [b"EHLO\tc.test"]), ("ehlo-8bit-host", [b"EHLO \xc3\xa9.test"]),
    ("ehlo-non-utf8-host", [b"EHLO \xff.test"]),
    ("helo", [HELO]), ("helo-lowercase", [b"helo c.test"]), ("helo-no-host", [b"HELO"]),
    ("helo-trailing-spaces", [b"HELO c.test  "]),
    ("ehlo-repeated", [EHLO, EHLO, b"EHLO d.test", EHLO, MAIL + b" SIZE=10"]),
    ("ehlo-then-helo", [EHLO, HELO, MAIL + b" SIZE=10", MAIL]),
    ("helo-then-ehlo", [HELO, EHLO, MAIL + b" SIZE=10"]),
    ("mail-before-ehlo", [MAIL, RCPT, b"DATA"]),
    ("mail-after-helo-with-params", [HELO, MAIL + b" SIZE=10", MAIL + b" BODY=8BITMIME", MAIL, *TAIL]),
    ("mail-after-helo-space", [HELO, MAIL + b" ", b"MAIL FROM: <a@b.test> ", RCPT + b" "]),
    ("mail-nested", [EHLO, MAIL, MAIL, b"MAIL FROM:<c@d.test> SIZE=10", RCPT]),
    ("rcpt-before-mail", [EHLO, RCPT, b"RCPT TO:<>", MAIL, RCPT]),
    ("rcpt-before-ehlo", [RCPT]),
    ("transaction", [EHLO, MAIL + b" SIZE=100 BODY=8BITMIME", RCPT, f"RCPT TO:<{REFUSED}>".encode(),
                     b"RCPT TO:<z@y.test>", b"DATA", MESSAGE, b"MAIL FROM:<c@d.test>", RCPT, b"DATA",
                     MESSAGE_8BIT, b"QUIT"]),
    ("transaction-helo", [HELO, MAIL, RCPT, b"DATA", MESSAGE, b"QUIT"]),
    ("transaction-smtputf8", [EHLO, b"MAIL FROM:<a@b.test> SMTPUTF8", RCPT, b"DATA", MESSAGE_8BIT]),
    ("data-with-argument", [EHLO, MAIL, RCPT, b"DATA x", b"DATA", MESSAGE]),
    # The last DATA is refused with the hooked handler (the RCPT was) and taken without: the message
    # after it is then commands, both ways the same.
    ("data-without-rcpt", [EHLO, b"DATA", MAIL, b"DATA", f"RCPT TO:<{REFUSED}>".encode(), b"DATA", MESSAGE]),
    ("data-before-ehlo", [b"DATA"]),
    ("data-too-much", [EHLO, MAIL, RCPT, b"DATA", b"x" * 600 + b"\r\n" + b"y" * 600 + b"\r\n.\r\n", RCPT]),
    ("data-empty", [EHLO, MAIL, RCPT, b"DATA", b".\r\n"]),
    ("rset", [EHLO, MAIL, RCPT, b"RSET", RCPT, MAIL, b"RSET x", RCPT, b"rset", b"RSET  "]),
    ("rset-before-ehlo", [b"RSET", b"RSET x", MAIL]),
    ("noop", [b"NOOP", b"NOOP x y", EHLO, b"NOOP", b"noop \xc3\xa9", b"NOOP \xff"]),
    ("vrfy-expn-help", [b"VRFY", b"VRFY <a@b.test>", b"VRFY a b", b"VRFY <\xff@b.test>", b"EXPN",
                        b"EXPN list", b"HELP", b"HELP MAIL", b"HELP mail", b"HELP FOO", EHLO, b"HELP MAIL",
                        b"HELP RCPT", b"HELP"]),
    ("bogus-limit", [b"FOO", b"BAR x", EHLO, b"BAZ", b"STARTTLS", b"AUTH PLAIN", b"QUX", b"NOOP"]),
    ("empty-line", [b"", b"   ", EHLO, b""]),
    ("non-ascii-command", [b"M\xc3\xa4IL FROM:<a@b.test>", b"\xffHLO c.test", b"NOOP"]),
    ("non-utf8-mail", [EHLO, b"MAIL FROM:<\xff@b.test>", RCPT, b"DATA", MESSAGE]),
    ("long-lines", [b"NOOP " + b"x" * 507, b"NOOP " + b"x" * 508, b"NOOP " + b"x" * 2000, EHLO,
                    b"NOOP " + b"x" * 508, b"HELP " + b"x" * 600]),
    ("mail-limit-before-ehlo", [HELO, _long_mail(512), b"RSET", _long_mail(513)]),
    ("mail-limit-after-ehlo", [EHLO, _long_mail(512), b"RSET", _long_mail(522), b"RSET", _long_mail(523),
                               b"RSET", _long_mail(538), b"RSET", _long_mail(548), b"RSET",
                               _long_mail(549)]),
    ("mail-limit-two-ehlo", [EHLO, EHLO, _long_mail(549), b"RSET", _long_mail(584), b"RSET",
                             _long_mail(585)]),
    ("rcpt-limit", [EHLO, MAIL, b"RCPT TO:<" + b"r" * 495 + b"@y.test>",
                    b"RCPT TO:<" + b"r" * 496 + b"@y.test>"]),
    ("quit", [EHLO, b"QUIT"]), ("quit-lowercase", [b"quit"]), ("quit-with-argument", [b"QUIT x", b"QUIT"]),
    ("quit-trailing-space", [b"QUIT "]),
    ("call-limit", [b"NOOP", b"NOOP", b"NOOP", b"NOOP", b"NOOP"]),
    ("call-limit-mail", [EHLO, MAIL, b"RSET", MAIL, b"RSET", MAIL, b"RSET", MAIL]),
    ("call-limit-bogus", [b"FOO", b"FOO", b"FOO", b"FOO"]),
    # Commands pipelined after the server has said goodbye and closed: nothing more may be done
    # for them (aiosmtpd stops within one command; a stored message nobody was told of would be
    # delivered twice when the client retries).
    ("after-bogus-limit", [b"FOO", b"FOO", b"FOO", b"FOO", b"FOO", EHLO, MAIL, RCPT, b"DATA", MESSAGE]),
    ("after-quit", [EHLO, MAIL, RCPT, b"QUIT", b"NOOP", b"RSET", b"DATA", MESSAGE]),
]
DIALOGUES += [(f"mail {arg!r}", [EHLO, arg, *TAIL, b"RSET"]) for arg in MAIL_ARGS]
DIALOGUES += [(f"rcpt {arg!r}", [EHLO, MAIL, arg, *TAIL]) for arg in RCPT_ARGS]
DIALOGUES += [(f"mail-helo {arg!r}", [HELO, arg, RCPT]) for arg in MAIL_ARGS[:12]]

# --- talking to a server ---------------------------------------------------------------


def _wire(item: bytes) -> bytes:
    return item if item.endswith(b"\r\n") else item + b"\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One complete reply: lines up to the one with a space (or nothing) after its code."""
    reply = b""
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        except (TimeoutError, ConnectionError):
            return reply + b"<no reply>"
        reply += line
        if not line or not line.endswith(b"\r\n"):
            return reply + b"<closed>"
        if line[3:4] != b"-":
            return reply


async def _line_by_line(port: int, items: list[bytes]) -> list[bytes]:
    """The greeting, then each item's reply (the rest, once the server has closed: not sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        replies = [await _reply(reader)]
        for item in items:
            if replies[-1].endswith(b"<closed>"):
                break
            writer.write(_wire(item))
            replies.append(await _reply(reader))
        return replies
    finally:
        writer.close()


async def _pipelined(port: int, items: list[bytes]) -> list[bytes]:
    """Everything in one write (QUIT added), then all the server writes until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(_wire(item) for item in [*items, b"QUIT"]))
        received = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
            except (TimeoutError, ConnectionError):
                return [*received.split(b"\r\n"), b"<no close>"]
            if not chunk:
                return received.split(b"\r\n")
            received += chunk
    finally:
        writer.close()


def _classes(config: dict[str, Any], lean_class: type[LeanSMTP]
             ) -> tuple[dict[str, Any], type[aiosmtpd.smtp.SMTP], type[LeanSMTP]]:
    kwargs = dict(config)
    limit = kwargs.pop("local_part_limit", None)
    if limit is None:
        return kwargs, aiosmtpd.smtp.SMTP, lean_class
    stock = type("StockLimited", (aiosmtpd.smtp.SMTP,), {"local_part_limit": limit})
    lean = type("LeanLimited", (lean_class,), {"local_part_limit": limit})
    return kwargs, stock, lean


# (dialogue [mode], command or "hook calls", stock's, lean's)
Difference = tuple[str, str, object, object]


def _stopped_sooner(mode: str, items: list[bytes], stock: list[bytes],
                    calls: dict[str, list[tuple[Any, ...]]]) -> bool:
    """Whether LeanSMTP's hook calls are fewer than, and the start of, aiosmtpd's in a pipelined
    dialogue the server ends before its last command.  aiosmtpd goes on with at most one command
    pipelined after it has closed (after QUIT with a hook, 421 or 502; its replies go nowhere), a
    step that a loop stopping at once does not take; one doing more than aiosmtpd is a difference."""
    closing = any(r.startswith((b"421 ", b"502 5.5.1")) for r in stock) or any(
        i.upper().rstrip(b" ") == b"QUIT" for i in items)  # here a QUIT is always followed by one more
    lean = calls["lean"]
    return mode == "pipelined" and closing and len(lean) < len(calls["stock"]) and (
        lean == calls["stock"][:len(lean)])


async def _compare(config: dict[str, Any], make_handler: Callable[[], Recorder],
                   lean_class: type[LeanSMTP] = LeanSMTP) -> list[Difference]:
    """(dialogue, mode, command, stock's, lean's) for every reply, and every dialogue's hook calls,
    that differ."""
    loop = asyncio.get_running_loop()
    kwargs, stock_class, lean = _classes(config, lean_class)
    handlers = {"stock": make_handler(), "lean": make_handler()}
    servers = {
        "stock": await loop.create_server(lambda: stock_class(handlers["stock"], loop=loop, **kwargs),
                                          "127.0.0.1", 0),
        "lean": await loop.create_server(lambda: lean(handlers["lean"], loop=loop, **kwargs),
                                         "127.0.0.1", 0),
    }
    ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    differences: list[Difference] = []
    try:
        for mode, talk in (("line", _line_by_line), ("pipelined", _pipelined)):
            for name, items in DIALOGUES:
                # One connection at a time, stock then lean: each constructor clears aiosmtpd's
                # class-level SMTP.command_size_limits and each EHLO adds to it, so both must
                # run a dialogue from the same state.
                got: dict[str, list[bytes]] = {}
                calls: dict[str, list[tuple[Any, ...]]] = {}
                for server in ("stock", "lean"):
                    handlers[server].calls.clear()
                    got[server] = await talk(ports[server], items)
                    calls[server] = list(handlers[server].calls)
                sent = [b"(greeting)", *items]
                stock, lean_got = got["stock"], got["lean"]
                for i in range(max(len(stock), len(lean_got))):
                    a = stock[i] if i < len(stock) else b"<nothing>"
                    b = lean_got[i] if i < len(lean_got) else b"<nothing>"
                    if a != b:
                        command = (sent[i].decode("latin-1")[:80] if mode == "line" and i < len(sent)
                                   else f"(reply line {i})")
                        differences.append((f"{name} [{mode}]", command, a, b))
                if calls["stock"] != calls["lean"] and not _stopped_sooner(mode, items, stock, calls):
                    differences.append((f"{name} [{mode}]", "hook calls", calls["stock"], calls["lean"]))
    finally:
        for s in servers.values():
            s.close()
            await s.wait_closed()
    return differences


# Every handler with the first settings; the other settings with the handlers they bear on.
CASES = [(config, handler) for config in CONFIGS for handler in HANDLERS
         if config == "smtputf8" or (config, handler) in {("call-limit-3", "other-hooks"),
                                                          ("decode-data", "other-hooks")}
         or (handler == "hooked" and config != "decode-data")]


@pytest.mark.parametrize(("config", "handler"), CASES)
def test_lean_smtp_answers_as_aiosmtpd(config: str, handler: str) -> None:
    differences = asyncio.run(asyncio.wait_for(_compare(CONFIGS[config], HANDLERS[handler]), 60))
    assert differences == [], pprint.pformat(differences, width=110)



# --- the drain limit: a client that does not read its replies ----------------------------

class Watched(LeanSMTP):
    """LeanSMTP noting the write buffer after each reply it wrote without waiting, and at each
    drain it waited in."""

    def __init__(self, *args: Any, seen: dict[str, list[int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A small kernel send buffer, so that what the client leaves unread piles up here.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().connection_made(transport)
        drain = self._writer.drain

        async def noted_drain() -> None:
            self.seen["drained at"].append(self._writer.transport.get_write_buffer_size())
            await drain()

        self._writer.drain = noted_drain  # type: ignore[method-assign]

    async def push(self, status: Any) -> None:
        drains = len(self.seen["drained at"])
        await super().push(status)
        if len(self.seen["drained at"]) == drains:
            self.seen["kept"].append(self._writer.transport.get_write_buffer_size())


async def _unread_noops(count: int) -> tuple[dict[str, list[int]], int]:
    """`count` pipelined NOOPs from a client that reads nothing for a while: what the server
    kept in its buffer, and how many replies the client got in the end."""
    loop = asyncio.get_running_loop()
    seen: dict[str, list[int]] = {"kept": [], "drained at": []}
    server = await loop.create_server(lambda: Watched(Recorder(), hostname="same.test", seen=seen),
                                      "127.0.0.1", 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, server.sockets[0].getsockname())
        sending = asyncio.ensure_future(loop.sock_sendall(sock, b"NOOP\r\n" * count + b"QUIT\r\n"))
        await asyncio.sleep(1.0)  # not reading: the server's buffer fills, then it must wait
        got = b""
        while not got.endswith(b"221 Bye\r\n"):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), READ_TIMEOUT)
            if not chunk:
                break
            got += chunk
        await asyncio.wait_for(sending, READ_TIMEOUT)
    finally:
        sock.close()
        server.close()
        await server.wait_closed()
    return seen, got.count(b"250 OK\r\n")


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])  # the receiver runs on uvloop
def test_replies_a_client_does_not_read_are_held_up_to_the_drain_limit(loop_kind: str) -> None:
    """Up to DRAIN_AT bytes waiting, a reply is written without waiting (the limit); past it,
    the loop waits for the client to read before it takes the next command: never more than one
    reply over the limit is held, and every reply still arrives."""
    count = 3 * DRAIN_AT // len(b"250 OK\r\n")  # three times what the limit holds
    run = uvloop.run if loop_kind == "uvloop" else asyncio.run
    seen, replies = run(asyncio.wait_for(_unread_noops(count), 60))
    assert replies == count
    assert seen["drained at"], "the client never read, yet the server never waited"
    assert all(size > DRAIN_AT for size in seen["drained at"])  # past the limit: it waits
    assert max(seen["kept"]) <= DRAIN_AT  # at the limit: it writes on
    assert max(seen["kept"]) > DRAIN_AT // 2  # (the buffer did fill towards the limit)


class Proxied(Hooked):
    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        self.calls.append(("PROXY", str(proxy_data.src_addr)))
        return True


def test_with_the_proxy_protocol_aiosmtpd_s_own_loop_answers() -> None:
    """LeanSMTP leaves a PROXY handshake, and the session after it, to aiosmtpd's loop."""

    async def both() -> dict[str, tuple[list[bytes], list[tuple[Any, ...]]]]:
        loop = asyncio.get_running_loop()
        out = {}
        for name, cls in (("stock", aiosmtpd.smtp.SMTP), ("lean", LeanSMTP)):
            handler = Proxied()
            server = await loop.create_server(
                lambda cls=cls, handler=handler: cls(handler, hostname="same.test", loop=loop,
                                                     proxy_protocol_timeout=5), "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(b"PROXY TCP4 192.0.2.7 192.0.2.8 1111 25\r\nEHLO c.test\r\n"
                         b"MAIL FROM:<a@b.test>\r\nQUIT\r\n")
            received = b""
            while chunk := await asyncio.wait_for(reader.read(65536), READ_TIMEOUT):
                received += chunk
            writer.close()
            server.close()
            await server.wait_closed()
            out[name] = (received.split(b"\r\n"), handler.calls)
        return out

    got = asyncio.run(asyncio.wait_for(both(), 30))
    assert got["lean"] == got["stock"]
    assert ("PROXY", "192.0.2.7") in got["lean"][1] and got["lean"][0][-2] == b"221 Bye"
