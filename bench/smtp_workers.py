"""Durable intake with several receiver processes on one port (`--smtp-workers`).

Runs `fallback smtp --smtp-workers N` (N = 1 and 2) against a redis-server with
appendfsync always, and the single-process no-op aiosmtpd handler of
bench/smtp_ingest.py as the baseline, all in this run; Postfix's smtp-source
drives 4 KiB messages at 10 and 50 connections.  Prints messages/s and the
ratio durable / no-op.

    .venv/bin/python bench/smtp_workers.py [--messages 3000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import redis  # noqa: E402
import smtp_ingest  # noqa: E402

from fallback import directory  # noqa: E402
from tests.servers import RedisServer, free_port, stop_pid, wait_port  # noqa: E402


def durable(redis_url: str, workers: int, conns: int, messages: int) -> float:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), FALLBACK_LOG_LEVEL="WARNING",
               FALLBACK_MAX_CONNECTIONS_PER_IP="1000", FALLBACK_MAX_COMMANDS="1000000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fallback", "smtp", "--redis-url", redis_url, "--smtp-port", str(port),
         "--smtp-workers", str(workers), "--hostname", "bench.test"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(1.5)  # the other processes bind a moment after the first
        smtp_ingest.drive(port, 4096, conns, 200)  # warm-up
        return smtp_ingest.drive(port, 4096, conns, messages)
    finally:
        stop_pid(proc)


def noop(conns: int, messages: int) -> float:
    port = free_port()
    proc = smtp_ingest.start_server("noop", port)
    try:
        smtp_ingest.drive(port, 4096, conns, 200)
        return smtp_ingest.drive(port, 4096, conns, messages)
    finally:
        stop_pid(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    args = ap.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="fallback-bench-workers-"))).start()
    try:
        r = redis.Redis.from_url(server.url)
        d = directory.Directory(r, directory.ensure_buckets(r, 65536))
        d.put(directory.Mailbox(smtp_ingest.RCPT, "default", "{PLAIN}x"))
        print(f"{'conns':>5} {'no-op/s':>9} {'1 proc/s':>9} {'2 proc/s':>9} {'1/no-op':>8} {'2/no-op':>8}")
        for conns in (10, 50):
            base = noop(conns, args.messages)
            one = durable(server.url, 1, conns, args.messages)
            two = durable(server.url, 2, conns, args.messages)
            print(f"{conns:>5} {base:>9.0f} {one:>9.0f} {two:>9.0f} {one / base:>8.2f} {two / base:>8.2f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
