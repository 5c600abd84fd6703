"""The one header reader (fallback.mailbox.headers) against the standard library's parser.

The scan is hand-written for speed (the receiver summarises every message);
these tests hold it to `email.parser.BytesHeaderParser` on the messages in
tests/data/messages (real-world shapes: encoded words, folded fields, LF or
CR line ends, 8-bit bytes, a header without a blank line after it, a line
that is no field) and on random header blocks.
"""

from __future__ import annotations

import email.parser
import email.policy
import random
import re
from email.message import EmailMessage
from pathlib import Path

import pytest

from fallback.mailbox import deliverscript, fields, headers, purge

MESSAGES = sorted((Path(__file__).parent / "data" / "messages").glob("*.eml"))


def stdlib_fields(raw: bytes) -> list[tuple[str, str]]:
    """(lower-case name, whitespace-collapsed value) as the stdlib parser reads the header."""
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    return [(k.lower(), " ".join(str(v).split())) for k, v in msg.raw_items()]


def fast_fields(raw: bytes) -> list[tuple[str, str]]:
    return [(k.decode("ascii", "surrogateescape"), " ".join(v.decode("ascii", "surrogateescape").split()))
            for k, v in headers.fields(raw)]


def generated() -> list[bytes]:
    """Messages the stdlib writes itself: folded long fields, encoded words, attachments."""
    out = []
    for n in range(5):
        m = EmailMessage()
        m["From"] = f"Zoë Ünicode {n} <zoe{n}@example.org>"
        m["To"] = ", ".join(f"Person {i} <p{i}@example.com>" for i in range(12))
        m["Subject"] = "Über lange Betreffzeilen, die gefaltet werden müssen " * (n + 1)
        m["Message-ID"] = f"<gen{n}@example.org>"
        m.set_content("Hallo\n" * 3)
        if n % 2:
            m.add_attachment(b"\0\1\2" * 100, maintype="application", subtype="octet-stream",
                             filename="data.bin")
        for policy in (email.policy.SMTP, email.policy.default):
            out.append(m.as_bytes(policy=policy))
    return out


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: p.name)
def test_fields_match_the_stdlib_parser_on_real_messages(path):
    raw = path.read_bytes()
    assert fast_fields(raw) == stdlib_fields(raw)


def test_fields_match_the_stdlib_parser_on_generated_messages():
    for raw in generated():
        assert fast_fields(raw) == stdlib_fields(raw)


def test_fields_match_the_stdlib_parser_on_random_header_blocks():
    rng = random.Random(12)
    pieces = [b"Subject: x", b"From: a@b", b"X-A:", b" folded", b"\tfolded", b"no colon here", b"",
              b"Bad Name: v", b"To:b@c", b":empty-name", b"X-\xff: 8bit", b"X:a:b", b"From x"]
    ends = [b"\r\n", b"\n", b"\r"]
    for _ in range(3000):
        lines = [rng.choice(pieces) for _ in range(rng.randint(0, 8))]
        raw = b"".join(line + rng.choice(ends) for line in lines) + rng.choice([b"", b"body\r\n"])
        assert fast_fields(raw) == stdlib_fields(raw), raw


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: p.name)
def test_block_is_the_header_as_it_came(path):
    raw = path.read_bytes()
    head = headers.block(raw)
    assert raw.startswith(head)
    # What the stdlib calls the header is exactly the fields in the block.
    assert fast_fields(head + b"\r\n\r\n") == stdlib_fields(raw)


def test_names_and_summary_of_a_real_message():
    raw = (Path(__file__).parent / "data" / "messages" / "newsletter.eml").read_bytes()
    assert {"from", "to", "subject", "date", "message-id", "dkim-signature", "received"} <= headers.names(raw)
    meta = headers.summarize(raw)
    assert meta[fields.FROM] == "Café Shop <newsletter@shop.example>"
    assert meta[fields.SUBJECT] == "Winter sale — 50% off"
    assert meta[fields.MSGID] == "<20261201080000.123@shop.example>"
    assert meta[fields.ATTACH] == "0"
    assert set(meta) == set(fields.PARSED)


def test_summary_takes_the_first_of_repeated_fields_and_never_raises():
    raw = (Path(__file__).parent / "data" / "messages" / "raw-8bit.eml").read_bytes()
    meta = headers.summarize(raw)
    assert meta[fields.SUBJECT].startswith("devoir")
    attach = (Path(__file__).parent / "data" / "messages" / "attachment.eml").read_bytes()
    assert headers.summarize(attach)[fields.ATTACH] == "1"
    for junk in (b"", b"\r\n", b"\0\0\0", b"Subject: =?bad?Q?=ZZ?=\r\n\r\n", b":\r\n" * 50):
        headers.summarize(junk)


def test_summary_is_bounded_and_has_no_nul():
    raw = b"Subject: " + b"x" * 5000 + b"\0y\r\n\r\nbody"
    subject = headers.summarize(raw)[fields.SUBJECT]
    assert len(subject) == headers.DISPLAY_LIMIT and "\0" not in subject


def test_every_field_the_scripts_write_is_declared():
    """The Lua sources spell field names; each must be one of fields.ALL."""
    sources = deliverscript.DELIVER_LUA + purge._PURGE_LUA
    named = set(re.findall(r"'H(?:GET|SET|INCRBY)', KEYS\[[^\]]+\], '(\w+)'", sources))
    named |= set(re.findall(r"\b(?:'|\")(\w+)(?:'|\"), ARGV\[a \+ \d\]", sources))
    named -= {"messages", "bytes", "mailstore"}  # the mailbox's info hash, not the message
    assert named and named <= set(fields.ALL), named - set(fields.ALL)
