"""Redis dies under load: 250 must mean stored; everything else must be a 4xx.

A dedicated redis-server (AOF, appendfsync always) is SIGKILLed while ten
SMTP clients send over a thousand messages, then restarted on the same port
and directory.  Every message that got 250 must come back byte-for-byte
through `fallback export`; every other one must have been answered 4xx.
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback.cli import main
from tests.conftest import add_mailbox
from tests.servers import RedisServer
from tests.smtpwire import Wire

pytestmark = pytest.mark.slow

RCPTS = ["alice@example.com", "bob@example.com", "carol@example.org"]
CLIENTS = 10
PER_CLIENT = 110


def message(token: str, n: int) -> bytes:
    filler = random.Random(token).randbytes(64 + 97 * (n % 40)).hex().encode()
    lines = [filler[i : i + 76] for i in range(0, len(filler), 76)]
    return (f"From: load@remote.test\r\nSubject: {token}\r\nMessage-ID: <{token}@remote.test>\r\n\r\n"
            f"token={token}\r\n").encode() + b"\r\n".join(lines) + b"\r\n"


class Client(threading.Thread):
    """Sends its messages one after another; records what each one was answered."""

    def __init__(self, port: int, index: int, outcomes: dict[str, Any], sent: dict[str, bytes],
                 progress: Counter[str]) -> None:
        super().__init__(daemon=True)
        self.port, self.index = port, index
        self.outcomes, self.sent, self.progress = outcomes, sent, progress

    def run(self) -> None:
        smtp: smtplib.SMTP | None = None
        for n in range(PER_CLIENT):
            token = f"tok-{self.index:02d}-{n:04d}"
            raw = message(token, n)
            rcpt = RCPTS[(self.index + n) % len(RCPTS)]
            self.sent[token] = raw
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                    smtp.ehlo("load.remote.test")
                smtp.sendmail("load@remote.test", [rcpt], raw)
                self.outcomes[token] = (250, rcpt)
            except smtplib.SMTPRecipientsRefused as exc:
                self.outcomes[token] = (exc.recipients[rcpt][0], rcpt)
                smtp.rset()  # type: ignore[union-attr]
            except smtplib.SMTPResponseException as exc:
                self.outcomes[token] = (exc.smtp_code, rcpt)
                try:
                    smtp.rset()  # type: ignore[union-attr]
                except smtplib.SMTPException:
                    smtp = None
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                self.outcomes[token] = ("lost", repr(exc))
                smtp = None
            self.progress["done"] += 1
        if smtp is not None:
            smtp.quit()


def exported(url: str, address: str, out: Path) -> dict[str, bytes]:
    """token -> stored bytes (without our Received: line), read back through `fallback export`."""
    assert main(["export", address, "--format", "maildir", "--output", str(out), "--redis-url", url]) == 0
    found: dict[str, bytes] = {}
    for path in out.rglob("cur/*"):
        data = path.read_bytes()
        m = re.match(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", data)
        assert m, data[:200]
        token = re.search(rb"token=(tok-\d+-\d+)", data).group(1).decode()  # type: ignore[union-attr]
        found[token] = data[m.end() :]
    return found


def test_sigkill_redis_under_load(receiver_factory: Any, settings: Any, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    server = RedisServer(tmp_path / "redis").start()
    r = redis.Redis.from_url(server.url)
    for addr in RCPTS:
        add_mailbox(r, settings, addr)
    # One client sends over a thousand messages: no per-client message rate here.
    rt = receiver_factory(redis_url=server.url, max_connections_per_ip=100, max_messages_per_ip_per_minute=0)
    outcomes: dict[str, Any] = {}
    sent: dict[str, bytes] = {}
    progress: Counter[str] = Counter()
    clients = [Client(rt.port, i, outcomes, sent, progress) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    try:
        while progress["done"] < 300:
            time.sleep(0.01)
        server.kill()  # SIGKILL mid-stream: no shutdown, no final fsync
        killed_at = progress["done"]
        time.sleep(1.0)
        server = RedisServer(tmp_path / "redis", port=server.port).start()
        for c in clients:
            c.join(240)
        assert not any(c.is_alive() for c in clients)
    finally:
        server.stop()
        server = RedisServer(tmp_path / "redis", port=server.port).start()

    codes = Counter(code for code, _ in outcomes.values())
    with capsys.disabled():
        print(f"\nSIGKILL after {killed_at} messages; outcomes {dict(codes)}")
    assert len(outcomes) == CLIENTS * PER_CLIENT >= 1000
    assert codes["lost"] == 0, [v for v in outcomes.values() if v[0] == "lost"][:3]
    assert all(code == 250 or 400 <= int(code) < 500 for code in codes), codes
    assert codes[250] > 300 and sum(n for c, n in codes.items() if c != 250) > 0

    stored: dict[str, bytes] = {}
    for addr in RCPTS:
        stored.update(exported(server.url, addr, tmp_path / addr))
    capsys.readouterr()
    for token, (code, _) in outcomes.items():
        if code == 250:
            assert token in stored, f"{token} got 250 but is not stored"
            assert stored[token] == sent[token], f"{token} differs"
    # A 451 may still have been stored (written, then the reply was lost): never twice, though.
    assert set(stored) <= set(sent)
    server.stop()


def test_redis_stopped_entirely_then_back(receiver_factory: Any, settings: Any, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    r = redis.Redis.from_url(server.url)
    for addr in RCPTS:
        add_mailbox(r, settings, addr)
    r.close()
    rt = receiver_factory(redis_url=server.url)
    try:
        # A transaction that passed RCPT while Redis was up, then DATA after it stopped.
        pending = Wire(rt.port)
        pending.expect("220")
        for cmd, code in (("EHLO c", "250"), ("MAIL FROM:<a@remote.test>", "250"),
                          ("RCPT TO:<alice@example.com>", "250"), ("DATA", "354")):
            pending.cmd(cmd)
            pending.expect(code)
        server.stop()
        pending.send(b"Subject: during\r\n\r\nx\r\n.\r\n")
        pending.expect("451 4.3.0")
        for _ in range(3):  # the receiver keeps running and keeps answering 4xx
            wire = Wire(rt.port)
            wire.expect("220")
            wire.cmd("EHLO c")
            wire.expect("250")
            wire.cmd("MAIL FROM:<a@remote.test>")
            wire.expect("250")
            # A recipient the receiver has not seen lately needs the directory: 4xx at RCPT.
            wire.cmd("RCPT TO:<bob@example.com>")
            wire.expect("451 4.4.3")
            # One it found seconds ago (directory_cache_ttl) passes RCPT, and DATA is 4xx.
            wire.cmd("RCPT TO:<alice@example.com>")
            wire.expect("250")
            wire.cmd("DATA")
            wire.expect("354")
            wire.send(b"Subject: cached\r\n\r\nx\r\n.\r\n")
            wire.expect("451 4.3.0")
            wire.cmd("QUIT")
            wire.close()
        server = RedisServer(tmp_path / "redis", port=server.port).start()
        # It recovers by itself, even on the connection that saw the failure.
        for _ in range(50):
            pending.cmd("MAIL FROM:<a@remote.test>")
            pending.expect("250")
            pending.cmd("RCPT TO:<alice@example.com>")
            reply = pending.reply()
            assert reply is not None
            if reply[-1].startswith("250"):
                break
            assert reply[-1].startswith("451"), reply
            pending.cmd("RSET")
            pending.expect("250")
            time.sleep(0.1)
        else:
            pytest.fail("never recovered")
        pending.cmd("DATA")
        pending.expect("354")
        pending.send(b"Subject: after\r\n\r\nback\r\n.\r\n")
        pending.expect("250 2.0.0")
        pending.close()
        with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
            smtp.sendmail("a@remote.test", ["bob@example.com"], b"Subject: fresh\r\n\r\nok\r\n")
        check = redis.Redis.from_url(server.url)
        assert check.zcard("mbx:{alice@example.com}:f:INBOX") == 1
        assert check.zcard("mbx:{bob@example.com}:f:INBOX") == 1
        check.close()
    finally:
        server.stop()
