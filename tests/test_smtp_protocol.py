"""Receiver behaviour that a dialogue table cannot express: several connections, TLS
pipelining, the Received: id, the mail log, and bad message content."""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from fallback.intake.receiver import normalize_line_ends
from fallback.mailbox.store import MailboxReader
from fallback.maillog import LOGGER_NAME
from fallback.ops.export import iter_mbox
from tests.smtpwire import Wire


def stored(r: redis.Redis, address: str) -> list[bytes]:
    reader = MailboxReader(r, address)
    return [raw for _, _, raw in reader.iter_messages()]


def strip_trace(raw: bytes) -> bytes:
    """The message without our prepended Received: line (three folded lines at most)."""
    assert raw.startswith(b"Received: from ")
    m = re.match(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", raw)
    assert m
    return raw[m.end() :]


def transaction(wire: Wire, rcpts: list[str], sender: str = "s@remote.test") -> None:
    wire.expect("220")
    wire.cmd("EHLO client.remote.test")
    wire.expect("250")
    wire.cmd(f"MAIL FROM:<{sender}>")
    wire.expect("250")
    for rcpt in rcpts:
        wire.cmd(f"RCPT TO:<{rcpt}>")
        wire.expect("250")
    wire.cmd("DATA")
    wire.expect("354")


# --- connection caps ---------------------------------------------------------------

def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    return s


def _greeting(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def test_total_connection_cap(receiver_factory: Any, mailboxes: list[str]) -> None:
    rt = receiver_factory(max_connections=2, max_connections_per_ip=100)
    first, second = _connect(rt.port), _connect(rt.port)
    assert _greeting(first).startswith(b"220")
    assert _greeting(second).startswith(b"220")
    third = _connect(rt.port)
    assert _greeting(third).startswith(b"421 4.7.0")
    assert third.recv(1024) == b""  # and closed
    first.close()
    # The slot is given back once the first connection is gone.
    for _ in range(50):
        fourth = _connect(rt.port)
        reply = _greeting(fourth)
        fourth.close()
        if reply.startswith(b"220"):
            break
        import time

        time.sleep(0.05)
    assert reply.startswith(b"220")
    for s in (second, third):
        s.close()


def test_per_ip_connection_cap(receiver_factory: Any, mailboxes: list[str]) -> None:
    rt = receiver_factory(max_connections=100, max_connections_per_ip=2)
    held = [_connect(rt.port), _connect(rt.port)]
    for s in held:
        assert _greeting(s).startswith(b"220")
    extra = _connect(rt.port)
    assert _greeting(extra).startswith(b"421 4.7.0")
    # Another client IP (127.0.0.2 is loopback too) still gets in.
    other = _connect(rt.port, source="127.0.0.2")
    assert _greeting(other).startswith(b"220")
    for s in [*held, extra, other]:
        s.close()


# --- STARTTLS ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return d / "cert.pem", d / "key.pem", client


def test_commands_pipelined_with_starttls_are_discarded(receiver_factory: Any, mailboxes: list[str],
                                                        r: redis.Redis, tls: Any) -> None:
    cert, key, client = tls
    rt = receiver_factory(tls_cert=cert, tls_key=key)
    wire = Wire(rt.port)
    wire.expect("220")
    wire.cmd("EHLO client.remote.test")
    assert any("STARTTLS" in line for line in wire.expect("250"))
    # CVE-2011-0411 style: plaintext commands in the same packet as STARTTLS.
    wire.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.com>\r\n")
    wire.expect("220")
    wire.buf = b""  # anything after 220 in the plaintext is the attacker's, not the server's
    wire.starttls(client)
    wire.cmd("EHLO client.remote.test")
    assert wire.expect("250")
    # The injected MAIL FROM never happened: RCPT now is out of sequence.
    wire.cmd("RCPT TO:<alice@example.com>")
    wire.expect("503")
    wire.cmd("MAIL FROM:<good@remote.test>")
    wire.expect("250")
    wire.cmd("RCPT TO:<alice@example.com>")
    wire.expect("250")
    wire.cmd("DATA")
    wire.expect("354")
    wire.send(b"Subject: tls\r\n\r\nbody\r\n.\r\n")
    wire.expect("250")
    wire.close()
    [raw] = stored(r, "alice@example.com")
    assert b"with ESMTPS id " in raw
    assert b"evil@remote.test" not in raw


def test_smtplib_starttls(receiver_factory: Any, mailboxes: list[str], r: redis.Redis, tls: Any) -> None:
    cert, key, client = tls
    rt = receiver_factory(tls_cert=cert, tls_key=key)
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
        smtp.starttls(context=client)
        smtp.sendmail("s@remote.test", ["bob@example.com"], b"Subject: t\r\n\r\nx\r\n")
    assert len(stored(r, "bob@example.com")) == 1


# --- Received: header and the mail log -----------------------------------------------

def test_received_header_carries_the_id_and_bytes_are_exact(receiver: Any, r: redis.Redis) -> None:
    raw = b"From: a@remote.test\r\nSubject: exact\r\n\r\nline one\r\n..leading dot\r\n\r\n"
    with smtplib.SMTP("127.0.0.1", receiver.port) as smtp:
        smtp.ehlo("client.remote.test")
        code, _ = smtp.mail("a@remote.test")
        code, _ = smtp.rcpt("alice@example.com")
        code, reply = smtp.data(raw)
    assert code == 250
    msg_id = re.search(rb"id=([0-9A-Z]{26})", reply)
    assert msg_id
    [got] = stored(r, "alice@example.com")
    header = got[: got.index(b"\r\n\t") + 200]
    assert b"by fallback.test (fallback) with ESMTP id " + msg_id.group(1) in header
    assert b"for <alice@example.com>" in got
    assert b"[127.0.0.1]" in got
    assert strip_trace(got) == raw  # smtplib dot-stuffs, the receiver un-stuffs: exact


def test_the_received_date_is_the_second_it_was_written() -> None:
    """The date text is kept per second (received._date): each line still shows its own second."""
    import email.utils
    import time

    from fallback.mailbox import received

    for _ in range(3):
        before = int(time.time())
        line = received.received_header("01J", "mx.test", "helo", "192.0.2.1", None, "ESMTP", None)
        after = int(time.time())
        date = line.decode().rstrip("\r\n").rpartition("; ")[2]
        assert date in {email.utils.formatdate(t, localtime=False) for t in range(before, after + 1)}
        time.sleep(0.6)


def test_one_mail_log_line_per_message_and_outcome(receiver: Any, caplog: pytest.LogCaptureFixture,
                                                   receiver_factory: Any) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    with smtplib.SMTP("127.0.0.1", receiver.port) as smtp:
        smtp.ehlo("x")
        smtp.mail("s@remote.test")
        smtp.rcpt("alice@example.com")
        smtp.rcpt("nobody@example.com")
        smtp.rcpt("bob@example.com")
        smtp.rcpt("x@elsewhere.test")
        code, reply = smtp.data(b"Subject: log\r\n\r\nx\r\n")
    assert code == 250
    msg_id = re.search(rb"id=([0-9A-Z]{26})", reply).group(1).decode()  # type: ignore[union-attr]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME]
    assert len(lines) == 4, lines
    received = [ln for ln in lines if ln.startswith("event=received")]
    rejected = [ln for ln in lines if ln.startswith("event=rejected")]
    assert {re.search(r" to=(\S+)", ln).group(1) for ln in received} == {  # type: ignore[union-attr]
        "alice@example.com", "bob@example.com"}
    for ln in received:
        assert f"id={msg_id}" in ln and "from=s@remote.test" in ln and "outcome=250" in ln
    assert any("to=nobody@example.com" in ln and 'outcome="550 5.1.1"' in ln for ln in rejected)
    assert any("to=x@elsewhere.test" in ln and 'outcome="550 5.7.1"' in ln for ln in rejected)
    for ln in rejected:
        assert f"id={msg_id}" in ln  # the transaction's id, shared with the stored message


def test_mail_log_for_size_and_storage_failure(receiver_factory: Any, mailboxes: list[str],
                                               caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    rt = receiver_factory(max_message_size=1000)
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
        smtp.ehlo("x")
        smtp.mail("s@remote.test")
        smtp.rcpt("alice@example.com")
        code, _ = smtp.data(b"Subject: big\r\n\r\n" + b"y" * 2000 + b"\r\n")
        assert code == 552

        async def fail(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("redis went away")

        monkeypatch.setattr("fallback.mailbox.delivery.deliver_async", fail)
        smtp.mail("s@remote.test")
        smtp.rcpt("bob@example.com")
        code, msg = smtp.data(b"Subject: small\r\n\r\nx\r\n")
        assert (code, msg[:5]) == (451, b"4.3.0")
        assert b"redis" not in msg
    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME]
    assert any(ln.startswith("event=rejected") and "to=alice@example.com" in ln
               and 'outcome="552 5.3.4"' in ln for ln in lines), lines
    assert any(ln.startswith("event=deferred") and "to=bob@example.com" in ln
               and 'outcome="451 4.3.0"' in ln for ln in lines), lines


# --- bad input -----------------------------------------------------------------------

BAD_MESSAGES = {
    "malformed-mime": (b"From: =?utf-8?q?broken\r\nContent-Type: multipart/mixed; boundary=\"nope\r\n"
                       b"Subject: =?x-unknown?B?!!!?=\r\nMIME-Version: 1.0\r\n\r\n--other\r\n"
                       b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--other\r\n"),
    "eight-bit-and-nul": (b"Subject: caf\xc3\xa9 \xff\xfe\r\nFrom: \xe9t\xe9@remote.test\r\n\r\n"
                          b"nul\x00byte and latin-1 \xe9\r\n\x00\x00\r\n"),
    "long-lines": b"Subject: long\r\nX-Long: " + b"h" * 5000 + b"\r\n\r\n" + b"b" * 100_000 + b"\r\n",
    "header-only": b"Subject: only headers\r\nFrom: a@remote.test\r\n",
    "no-headers": b"\r\njust a body\r\n",
    "empty-ish": b"\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_bad_content_is_stored_exactly(name: str, receiver: Any, r: redis.Redis, tmp_path: Path) -> None:
    raw = BAD_MESSAGES[name]
    wire = Wire(receiver.port)
    transaction(wire, ["alice@example.com"])
    wire.send(raw + b".\r\n")
    wire.expect("250 2.0.0")
    wire.cmd("QUIT")
    wire.expect("221")
    wire.close()
    [got] = stored(r, "alice@example.com")
    assert strip_trace(got) == raw
    meta = MailboxReader(r, "alice@example.com").meta(MailboxReader(r, "alice@example.com").ids("INBOX")[0])
    assert meta is not None and meta["size"] == str(len(got))
    # And it comes back out of an mbox export unchanged.
    from fallback.ops.export import write_mbox

    write_mbox(MailboxReader(r, "alice@example.com"), tmp_path / "out.mbox")
    assert list(iter_mbox(tmp_path / "out.mbox")) == [got]


SMUGGLING = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_cannot_inject_a_second_message(name: str, receiver: Any, r: redis.Redis) -> None:
    end = SMUGGLING[name]
    payload = (b"Subject: first\r\n\r\nvisible text" + end
               + b"MAIL FROM:<forged@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
               + b"Subject: smuggled\r\n\r\nsmuggled text\r\n")
    wire = Wire(receiver.port)
    transaction(wire, ["alice@example.com"])
    wire.send(payload + b".\r\n")
    wire.expect("250 2.0.0")
    wire.cmd("NOOP")
    wire.expect("250")  # the next reply is for NOOP: no extra replies were queued
    wire.cmd("QUIT")
    wire.expect("221")
    wire.close()
    assert stored(r, "bob@example.com") == []
    [got] = stored(r, "alice@example.com")
    assert b"smuggled text" in got and b"MAIL FROM:<forged@example.com>" in got
    # One message holding both "messages", every line end CRLF: a later SMTP hop dot-stuffs the fake end.
    assert got.count(b"Subject: ") == 2
    assert normalize_line_ends(got) == (got, False)


def test_bare_line_ends_are_normalised(receiver: Any, r: redis.Redis) -> None:
    wire = Wire(receiver.port)
    transaction(wire, ["alice@example.com"])
    wire.send(b"Subject: mixed\nX-A: 1\r\rbody\rline\nend\r\n.\r\n")
    wire.expect("250")
    wire.close()
    [got] = stored(r, "alice@example.com")
    assert strip_trace(got) == b"Subject: mixed\r\nX-A: 1\r\n\r\nbody\r\nline\r\nend\r\n"


@pytest.mark.parametrize(("data", "want", "changed"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n", False),
    (b"a\nb\n", b"a\r\nb\r\n", True),
    (b"a\rb\r", b"a\r\nb\r\n", True),
    (b"a\r\r\nb", b"a\r\n\r\nb", True),
    (b"\n.\n", b"\r\n.\r\n", True),
    (b"", b"", False),
])
def test_normalize_line_ends(data: bytes, want: bytes, changed: bool) -> None:
    assert normalize_line_ends(data) == (want, changed)

