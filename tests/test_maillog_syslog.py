"""--mail-log syslog: the logfmt lines reach a real syslog socket with facility mail, tag fallback[PID].

The test binds the sockets a syslog daemon would (a Unix datagram socket, a UDP
port on loopback) and reads what a real `fallback smtp` process sends while it
takes real SMTP mail; bad destinations are refused at start with one line.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys, maillog
from fallback.cli import main
from fallback.mailbox import record
from fallback.maillog import MailLog
from tests.servers import free_port, stop_pid, wait_port
from tests.webutil import simple

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"<(\d+)>fallback\[(\d+)\]: (event=.*)")
MAIL_INFO = 2 * 8 + 6  # facility mail (2), severity info (6): <22>, as Postfix's lines


@pytest.fixture
def syslog_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound Unix datagram socket, where /dev/log would be (short path: sun_path is 108 bytes)."""
    where = tempfile.mkdtemp(prefix="fb-syslog-")
    path = os.path.join(where, "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    yield sock, path
    sock.close()
    shutil.rmtree(where, ignore_errors=True)


def datagrams(sock: socket.socket, until: Any, timeout: float = 20.0) -> list[str]:
    """What arrives until `until(lines)` holds (bounded in time and count)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < 1000 and not until(got):
        try:
            got.append(sock.recv(65536).decode())
        except TimeoutError:
            continue
    return got


def test_smtp_receiver_logs_to_syslog_socket(syslog_socket: tuple[socket.socket, str], r: redis.Redis,
                                             redis_url: str, mailboxes: list[str]) -> None:
    sock, path = syslog_socket
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLBACK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fallback", "smtp", "--redis-url", redis_url, "--smtp-host", "127.0.0.1",
         "--smtp-port", str(port), "--smtp-workers", "1", "--hostname", "fb.test",
         "--mail-log", f"syslog:{path}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        wait_port(port, timeout=30)
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as s:
            refused = s.sendmail("ann@remote.test", ["alice@example.com", "nobody@example.com"], simple())
        assert list(refused) == ["nobody@example.com"]
        lines = datagrams(sock, lambda got: len(got) >= 2)
    finally:
        stop_pid(proc)  # type: ignore[arg-type]
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    assert {int(m.group(1)) for m in parsed if m} == {MAIL_INFO}
    assert {int(m.group(2)) for m in parsed if m} == {proc.pid}
    text = [m.group(3) for m in parsed if m]
    received = [t for t in text if t.startswith("event=received ")]
    rejected = [t for t in text if t.startswith("event=rejected ")]
    assert len(received) == 1 and " to=alice@example.com " in received[0] and " outcome=250 " in received[0]
    assert len(rejected) == 1 and " to=nobody@example.com " in rejected[0]
    assert ' outcome="550 5.1.1" ' in rejected[0]
    msg_id = re.search(r" id=(\S+)", received[0]).group(1)  # type: ignore[union-attr]
    assert record.read_raw(r, keys.message("alice@example.com", msg_id))  # what the line says was kept
    assert "event=" not in stderr  # the mail log went to syslog only, not twice


def test_udp_syslog_on_loopback() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    port = sock.getsockname()[1]
    logger = logging.getLogger("tests.maillog.udp")
    handler = maillog.handler(f"syslog:127.0.0.1:{port}")
    assert handler is not None
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        MailLog(logger).rejected("01TESTID", "ann@remote.test", "x y@example.com", outcome="550 5.1.1",
                                 reason="no such user", peer="127.0.0.2")
        lines = datagrams(sock, lambda got: bool(got))
    finally:
        logger.removeHandler(handler)
        handler.close()
        sock.close()
    assert lines == [f"<{MAIL_INFO}>fallback[{os.getpid()}]: event=rejected id=01TESTID from=ann@remote.test "
                     'to="x y@example.com" outcome="550 5.1.1" peer=127.0.0.2 reason="no such user"']


HELP = ("the mail log goes to -/stderr (the default; under systemd that is the journal), syslog, "
        "syslog:/path/to/socket, syslog:HOST:PORT (UDP) or a file path")


@pytest.mark.parametrize(("destination", "message"), [
    ("syslog:", f"mail_log: 'syslog:' names no socket or HOST:PORT; {HELP}"),
    ("syslog:localhost:99999", "mail_log: 'syslog:localhost:99999' must be syslog:/path/to/socket or "
                               f"syslog:HOST:PORT (a UDP port 1-65535); {HELP}"),
    ("syslog::514", "mail_log: 'syslog::514' must be syslog:/path/to/socket or syslog:HOST:PORT (a UDP "
                    f"port 1-65535); {HELP}"),
    ("journald", "mail_log: 'journald' is not a destination of its own: under systemd the default "
                 "(stderr) already goes to the journal, tagged by the unit's SyslogIdentifier "
                 "(journalctl -t fallback); or use syslog"),
    ("syslog:/nonexistent-fallback-dir/log",
     "mail_log: cannot open syslog:/nonexistent-fallback-dir/log: No such file or directory"),
])
def test_bad_destination_is_refused_in_one_line(destination: str, message: str, redis_url: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    rc = main(["smtp", "--redis-url", redis_url, "--smtp-port", str(port), "--mail-log", destination])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == f"fallback smtp: {message}\n"
    with pytest.raises(OSError):  # refused before anything listened: no mail was taken
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
