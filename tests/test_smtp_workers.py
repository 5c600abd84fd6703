"""Several receiver processes on one port (SO_REUSEPORT): both listen, mail is stored, all stop together."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import redis

from fallback import keys
from fallback.mailbox import fields
from tests.conftest import add_mailbox
from tests.servers import wait_for

ROOT = Path(__file__).resolve().parent.parent


def listeners(port: int) -> int:
    """LISTEN sockets on the port: with SO_REUSEPORT each process has its own."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def start_receivers(redis_url: str, n: int) -> tuple[subprocess.Popen[str], int, list[int]]:
    """`fallback smtp --smtp-workers n` as a subprocess: (process, port, pids from its banner)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FALLBACK_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fallback", "smtp", "--redis-url", redis_url, "--smtp-port", "0",
         "--smtp-workers", str(n), "--hostname", "fallback.test"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = ""
    deadline = time.monotonic() + 60
    while "ready" not in banner and time.monotonic() < deadline:  # bounded
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            break
        banner += line
    m = re.search(rf"SMTP receiver on [\d.]+:(\d+) \({n} processes: ([\d, ]+)\)", banner)
    if not m:
        proc.kill()
        proc.wait()
        raise AssertionError(banner)
    return proc, int(m.group(1)), [int(p) for p in m.group(2).split(", ")]


def gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text().lower()


def test_two_receiver_processes_share_the_port(r: redis.Redis, settings, redis_url: str) -> None:
    add_mailbox(r, settings, "alice@example.com")
    proc, port, pids = start_receivers(redis_url, 2)
    try:
        for _ in range(100):  # bounded: the child binds a moment after the banner
            if listeners(port) == 2:
                break
            time.sleep(0.05)
        assert listeners(port) == 2
        for n in range(30):  # a fresh connection each: the kernel spreads them over both
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.sendmail("a@remote.test", ["alice@example.com"],
                                f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
        assert r.zcard(keys.folder("alice@example.com", fields.INBOX)) == 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert all(gone(pid) for pid in pids)
        assert listeners(port) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_negative_workers_refused(r: redis.Redis, redis_url: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "fallback", "smtp", "--redis-url", redis_url,
                           "--smtp-workers", "-1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "fallback smtp: smtp_workers: must be 0 (one per CPU) or more"


def test_receivers_started_by_a_killed_receiver_end_with_it(r: redis.Redis, redis_url: str) -> None:
    """SIGKILL gives the first receiver no chance to stop the others: the kernel tells them."""
    proc, _, pids = start_receivers(redis_url, 3)
    children = pids[1:]
    try:
        proc.kill()
        proc.wait(30)

        wait_for(lambda: all(gone(pid) for pid in children), 60, "the started receivers to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
