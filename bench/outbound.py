"""Outbound delivery throughput: messages/s from the queue to Postfix's smtp-sink.

Fills the outbound queue with N messages (from 64 senders, so every stream
shard has work), starts K `fallback worker` processes against a fresh durable
redis-server (AOF, appendfsync always, as the embedded one) and times until
every recipient is recorded delivered.  Runs K=1 and K=4 (each process
delivering --concurrency messages at a time) and, as the baseline, Postfix's
own load generator smtp-source sending the same number of messages of the
same size to the same sink over 1 and 4 parallel sessions: the ceiling of
what loopback SMTP to that sink allows.

    .venv/bin/python bench/outbound.py              # 2000 messages
    .venv/bin/python bench/outbound.py -n 500       # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fallback import ids, keys  # noqa: E402
from fallback.queues import outbound  # noqa: E402
from tests.servers import RedisServer, SmtpSink, postfix_env, postfix_tool, stop_pid  # noqa: E402

SENDERS = 64
BODY_LINES = 40  # about 3 KB per message, a typical short mail


def message(sender: str, rcpt: str, n: int) -> bytes:
    body = "".join(f"line {i} of a benchmark message, padded to a realistic width......\r\n"
                   for i in range(BODY_LINES))
    return (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {n}\r\n\r\n{body}").encode()


def fill(r: redis.Redis, n: int) -> int:
    size = 0
    for i in range(n):
        sender = f"user{i % SENDERS}@example.com"
        raw = message(sender, f"rcpt{i}@remote.test", i)
        size = len(raw)
        outbound.submit(r, sender=sender, mailstore="default", recipients=[f"rcpt{i}@remote.test"],
                        raw=raw, msg_id=ids.new_id())
    return size


def pending(r: redis.Redis) -> int:
    pipe = r.pipeline(transaction=False)
    for s in range(SENDERS):
        pipe.scard(keys.outbox(f"user{s}@example.com"))
    return sum(pipe.execute())


def run_workers(url: str, port: int, n: int, processes: int, concurrency: int,
                tmp: Path) -> tuple[float, float, float]:
    r = redis.Redis.from_url(url)
    r.flushall()
    fill(r, n)
    cmd = [sys.executable, "-m", "fallback", "worker", "--redis-url", url, "--smarthost",
           f"127.0.0.1:{port}", "--smarthost-tls", "none", "--worker-concurrency", str(concurrency),
           "--log-level", "WARNING", "--mail-log", str(tmp / "mail.log")]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(processes)]
    try:
        deadline = started + 600
        while pending(r) and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        if pending(r):
            raise SystemExit(f"bench: {pending(r)} message(s) still queued after 600 s")
    finally:
        for p in procs:
            stop_pid(p)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    window = delivery_window(r)
    r.close()
    return elapsed, window, cpu


def delivery_window(r: redis.Redis) -> float:
    """Seconds from the first recorded delivery to the last: throughput without process start-up."""
    times = []
    for key in r.scan_iter(match="mbx:*:out:*", count=1000):
        for field, value in r.hgetall(key).items():
            if field.startswith(b"rcpt:"):
                times.append(json.loads(value)["last"])
    return max(times) - min(times)


def run_source(port: int, n: int, sessions: int, size: int) -> float:
    cmd = [*postfix_tool("smtp-source"), "-s", str(sessions), "-m", str(n), "-l", str(size),
           "-f", "user0@example.com", "-t", "rcpt@remote.test", f"127.0.0.1:{port}"]
    started = time.monotonic()
    subprocess.run(cmd, check=True, env=postfix_env(), stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="messages per run (default 2000)")
    ap.add_argument("--concurrency", type=int, default=8, help="deliveries at a time per worker process")
    ap.add_argument("--appendfsync", choices=("always", "everysec"), default="always",
                    help="Redis AOF fsync policy (default always, as the embedded Redis)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-outbound-"))
    server = RedisServer(tmp / "redis", extra=["--appendfsync", args.appendfsync]).start()
    sink = SmtpSink(dump=False).start()
    try:
        size = len(message("user0@example.com", "rcpt0@remote.test", 0))
        results = {}
        notes: list[str] = []
        for sessions in (1, 4):
            results[f"smtp-source, {sessions} session(s)"] = args.n / run_source(sink.port, args.n,
                                                                              sessions, size)
        for processes in (1, 4):
            t, window, cpu = run_workers(server.url, sink.port, args.n, processes, args.concurrency, tmp)
            results[f"fallback worker x{processes} (concurrency {args.concurrency})"] = (args.n - 1) / window
            notes.append(f"  x{processes}: {args.n / t:.0f} msg/s counting process start-up ({t:.1f} s); "
                         f"worker CPU {cpu:.1f} s = {1000 * cpu / args.n:.2f} ms per message "
                         f"on {os.cpu_count()} CPU(s)")
    finally:
        sink.cleanup()
        server.stop()
    print(f"outbound delivery: {args.n} messages of {size} bytes, one recipient each, "
          f"Redis AOF appendfsync {args.appendfsync}, smarthost = Postfix smtp-sink on loopback")
    base1 = results["smtp-source, 1 session(s)"]
    base4 = results["smtp-source, 4 session(s)"]
    one = results[f"fallback worker x1 (concurrency {args.concurrency})"]
    four = results[f"fallback worker x4 (concurrency {args.concurrency})"]
    for name, rate in results.items():
        print(f"  {name:<40} {rate:8.0f} msg/s")
    print(f"  4 workers / 1 worker:                    {four / one:8.2f}x")
    print(f"  1 worker / smtp-source 1 session:        {one / base1:8.2f}x")
    print(f"  4 workers / smtp-source 4 sessions:      {four / base4:8.2f}x")
    print("worker rates are first to last recorded delivery; wall clock from process start:")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
