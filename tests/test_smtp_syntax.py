"""The receiver's short paths through SMTP syntax give exactly what aiosmtpd's own code gives.

`simple_path` is checked against aiosmtpd's address parser, `read_data` against
a line-by-line reader written from RFC 5321 4.5.2 (what aiosmtpd does), on
fixed tricky cases and on seeded random ones, split across TCP reads at
random places.  Then the same through a real receiver.
"""

from __future__ import annotations

import asyncio
import random
import types
from typing import Any

import pytest
import redis
from aiosmtpd.smtp import SMTP

from fallback.intake.smtpsyntax import read_data, simple_path
from fallback.mailbox.store import MailboxReader
from tests.smtpwire import Wire

# --- MAIL / RCPT paths ---------------------------------------------------------------

PATHS = [
    "<alice@example.com>", "<alice@example.com> SIZE=1000 BODY=8BITMIME", "<a.b+tag@sub.example.com>",
    "<A!#$%&'*+/=?^_`{|}~-@x.y>", "<>", "<a..b@example.com>", "<.a@example.com>", "<a.@example.com>",
    '<"quoted local"@example.com>', "<a@[127.0.0.1]>", "<@relay.test:a@example.com>", "alice@example.com",
    "<alice@example.com", "<alice@>", "<@example.com>", "<alice example.com>", "<al ice@example.com>",
    "<alice@exa mple.com>", "<(comment)alice@example.com>", "<alice@example.com>>", "<<alice@example.com>",
    "<alice@example..com>", "<alice@.example.com>", "<caf\u00e9@example.com>", "<alice@b\u00fccher.test>",
    " <alice@example.com>", "<alice@example.com>\tSIZE=5", "<a@b>x", "<a@b>", "<a@b>\u00e9",
    "<a@b> \r\x0b X ", "<a@b>\r", "<a@b> (comment) SIZE=5", "<a@b>(c)", "<a@b> ",
]


def stock_getaddr(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    return SMTP._getaddr(types.SimpleNamespace(local_part_limit=local_part_limit), arg)  # type: ignore[arg-type]


def random_part(rng: random.Random) -> str:
    alphabet = rng.choice(["ab.-+", "ab.@<>\"() \\[]:,;+-_=~!'\u00e9\t\r\x0b"])
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))


@pytest.mark.parametrize("arg", PATHS)
def test_simple_path_agrees_with_aiosmtpd(arg: str) -> None:
    found = simple_path(arg)
    if found is not None:
        assert found == stock_getaddr(arg)


def test_simple_path_takes_the_common_forms() -> None:
    assert simple_path("<alice@example.com>") == ("alice@example.com", "")
    assert simple_path("<a.b+tag@sub.example.com> SIZE=10") == ("a.b+tag@sub.example.com", "SIZE=10")
    assert simple_path("<" + "a" * 70 + "@example.com>", local_part_limit=64) is None
    for unusual in ("<>", '<"q"@example.com>', "<a..b@example.com>", "alice@example.com", "<a@[1.2.3.4]>"):
        assert simple_path(unusual) is None


def test_simple_path_agrees_on_random_input() -> None:
    rng = random.Random(5321)
    taken = 0
    for _ in range(20_000):
        arg = "<" + random_part(rng) + "@" + random_part(rng) + ">" + random_part(rng)
        found = simple_path(arg)
        if found is not None:
            taken += 1
            assert found == stock_getaddr(arg), arg
    assert taken > 50  # the generator does reach the short path


# --- DATA ----------------------------------------------------------------------------

def reference_read(stream: bytes, size_limit: int | None) -> tuple[bytes | None, bytes]:
    """Line by line, as RFC 5321 4.5.2 and aiosmtpd: (message or None if too big, what follows)."""
    lines, size, pos = [], 0, 0
    while True:
        end = stream.index(b"\r\n", pos) + 2
        line, pos = stream[pos:end], end
        if line == b".\r\n":
            break
        size += len(line)
        lines.append(line[1:] if line.startswith(b".") else line)
    if size_limit and size > size_limit:
        return None, stream[pos:]
    return b"".join(lines), stream[pos:]


async def run_reader(stream: bytes, cuts: list[int], size_limit: int | None,
                     buffer_limit: int = 2**16) -> tuple[bytes | None, bytes]:
    reader = asyncio.StreamReader(limit=buffer_limit)

    async def feed() -> None:
        start = 0
        for cut in [*cuts, len(stream)]:
            reader.feed_data(stream[start:cut])
            start = cut
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    got = await read_data(reader, size_limit)
    await feeder
    return got, await reader.read()


LINES = [b"text", b".", b"..", b".x", b"x.", b"", b"\r", b"\n", b"a\nb", b"a\rb", b". .", b"\n.\n",
         b"\r.\r", b"\n.", b".\r", b"x" * 300, b"\x00\xff", b"end."]


def random_message(rng: random.Random) -> bytes:
    """A dot-stuffed message as a client sends it, with its end line and a command after."""
    body = b"".join(rng.choice(LINES) + b"\r\n" for _ in range(rng.randint(0, 30)))
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n"))
    return stuffed + b".\r\nQUIT\r\n"


FIXED = [
    b".\r\n",                                   # empty message
    b"a\r\n.\r\n",
    b"..\r\n.\r\n",                             # one line holding a dot
    b"...\r\n..x\r\nx.\r\n.\r\n",
    b"x\n.\nMAIL FROM:<f@x>\r\n.\r\n",          # smuggling: only CRLF.CRLF ends DATA
    b"x\r.\r\n.\r\n", b"x\n.\r\n.\r\n", b"x\r\n.\nstill\r\n.\r\n",
    b"end of sentence.\r\nmore.\r\n.\r\n",
    b"\r\n\r\n.\r\n",
]


@pytest.mark.parametrize("stream", FIXED)
def test_read_data_fixed_cases(stream: bytes) -> None:
    stream += b"NOOP\r\n"
    want = reference_read(stream, None)
    for cuts in ([], *([c] for c in range(1, len(stream)))):
        assert asyncio.run(run_reader(stream, cuts, None)) == want, cuts


def test_read_data_random_messages_and_splits() -> None:
    rng = random.Random(4252)

    async def all_cases() -> None:
        for _ in range(1500):
            stream = random_message(rng)
            cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
            limit = rng.choice([None, 0, 50, 200, len(stream)])
            buffer_limit = rng.choice([8, 64, 2**16])  # small: the reads past the buffer limit
            got = await run_reader(stream, cuts, limit, buffer_limit)
            assert got == reference_read(stream, limit), (stream, cuts, limit, buffer_limit)

    asyncio.run(all_cases())


def test_read_data_size_limit_is_exact() -> None:
    message = b"x" * 98 + b"\r\n"  # 100 bytes as sent
    assert asyncio.run(run_reader(message + b".\r\n", [], 100)) == (message, b"")
    assert asyncio.run(run_reader(message + b".\r\n", [], 99)) == (None, b"")
    # A big message is dropped as it arrives, and what follows it is still read as commands.
    big = b"y" * 998 + b"\r\n"
    assert asyncio.run(run_reader(big * 200 + b".\r\nQUIT\r\n", list(range(7, 200_000, 4096)), 5000,
                                  buffer_limit=1024)) == (None, b"QUIT\r\n")


# --- through the receiver -------------------------------------------------------------

def start_data(port: int, rcpt: str, hello: str = "EHLO", sender: str = "<s@remote.test>") -> Wire:
    """A connection that has just had its 354."""
    wire = Wire(port)
    wire.expect("220")
    for command, reply in ((f"{hello} client.remote.test", "250"), (f"MAIL FROM:{sender}", "250"),
                           (f"RCPT TO:{rcpt}", "250"), ("DATA", "354")):
        wire.cmd(command)
        wire.expect(reply)
    return wire


def stored_one(r: redis.Redis) -> bytes:
    [(_, _, raw)] = list(MailboxReader(r, "alice@example.com").iter_messages())
    return raw


def test_dot_stuffed_lines_and_pipelined_quit(receiver: Any, r: redis.Redis) -> None:
    wire = start_data(receiver.port, '<"alice"@example.com>')  # the long way through aiosmtpd's parser
    # Dot-stuffed lines, and QUIT in the same packet as the end of the message.
    wire.send(b"..leading dot\r\n..\r\nlast.\r\n.\r\nQUIT\r\n")
    wire.expect("250 2.0.0")
    wire.expect("221")
    wire.close()
    assert stored_one(r).endswith(b"\r\n.leading dot\r\n.\r\nlast.\r\n")


def test_empty_message_is_stored(receiver: Any, r: redis.Redis) -> None:
    wire = start_data(receiver.port, "<alice@example.com>", hello="HELO", sender="<>")
    wire.send(b".\r\n")
    wire.expect("250 2.0.0")
    wire.close()
    raw = stored_one(r)
    assert raw.startswith(b"Received: ") and raw.endswith(b"\r\n")  # our trace line, nothing else


def test_a_line_longer_than_the_stream_buffer_is_kept(receiver: Any, r: redis.Redis) -> None:
    # 1.5 MiB without a line break: more than the reader's 1 MiB buffer, under the size limit.
    body = b"Subject: one long line\r\n\r\n" + b"A" * (3 * 2**19) + b"\r\n"
    wire = start_data(receiver.port, "<alice@example.com>")
    wire.send(body + b".\r\n")
    wire.expect("250 2.0.0")
    wire.close()
    raw = stored_one(r)
    trace = raw[: -len(body)]
    assert raw.endswith(body) and trace.startswith(b"Received: ") and b"\r\n\r\n" not in trace
