"""Durable intake with several receiver processes on one port (`--smtp-workers`).

For N receiver processes (default 1 and 2), in this same run:

- durable: `fallback smtp --smtp-workers N` storing into a redis-server with
  appendonly yes, appendfsync always (every 250 waits for an fsynced write);
  with `--cluster` also into a real Redis Cluster (tests.servers.RedisClusterServers:
  3 primaries + 3 replicas, every node appendfsync always) through a
  `redis+cluster://` URL;
- no-op: N processes of the no-op aiosmtpd handler of bench/smtp_ingest.py
  sharing one port (SO_REUSEPORT, as the receiver does), storing nothing;
- smtp-sink: Postfix's sink, the ceiling of an SMTP server that stores nothing.

Postfix's smtp-source drives 4 KiB messages at 50 connections (and 10 with
`--concurrency 10,50`).  Prints messages/s and the ratios durable / no-op and
durable / sink, and the target of issue 7 (>= 1,500 durable messages/s).

Every process (load generator, receivers, redis-servers) shares this machine's
cores: on the 2-core VM the cluster's six redis-servers compete with the
receivers and smtp-source for the same 2 cores.

    .venv/bin/python bench/smtp_workers.py                   # single redis-server, 1 and 2 processes
    .venv/bin/python bench/smtp_workers.py --cluster         # also the Redis Cluster
    .venv/bin/python bench/smtp_workers.py --cluster --workers 2 --messages 5000
    .venv/bin/python bench/smtp_workers.py --cluster --store-only  # the Redis write alone, no SMTP
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import smtp_ingest  # noqa: E402

from fallback import redisconn  # noqa: E402
from fallback.mailbox import (  # noqa: E402
    delivery,
    directory,
)
from fallback.mailbox.batcher import DeliveryBatcher  # noqa: E402
from tests.servers import RedisClusterServers, RedisServer, free_port, stop_pid, wait_port  # noqa: E402

SIZE = 4096
TARGET = 1500.0  # issue 7: durable messages/s on this 2-core machine


def provision(redis_url: str) -> None:
    r = redisconn.sync_client(redis_url)
    d = directory.Directory(r, directory.ensure_buckets(r, 65536))
    d.put(directory.Mailbox(smtp_ingest.RCPT, "default", "{PLAIN}x"))
    r.close()


def stored(redis_url: str) -> int:
    r = redisconn.sync_client(redis_url)
    try:
        return int(r.zcard("mbx:{" + smtp_ingest.RCPT + "}:f:INBOX"))
    finally:
        r.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except FileNotFoundError:
        return []


@dataclass
class Point:
    rate: float          # messages/s
    cpu_ms: float = 0.0  # CPU ms per message of the SMTP server's processes
    redis_ms: float = 0.0  # CPU ms per message of the redis-server processes
    source_ms: float = 0.0  # CPU ms per message of smtp-source, the load generator


def measure(port: int, conns: int, messages: int, pids: list[int],
            redis_pids: list[int] | None = None) -> Point:
    """Rate of `messages` after a warm-up, and the CPU the server's processes spent on them.

    CPU per message depends much less than the rate on what else runs on the machine.
    """
    smtp_ingest.drive(port, SIZE, conns, 200)  # warm-up: connections, script cache, caches
    redis_pids = redis_pids or []
    before = [cpu_seconds(p) for p in pids], [cpu_seconds(p) for p in redis_pids]
    source = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate = smtp_ingest.drive(port, SIZE, conns, messages)
    source_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = [cpu_seconds(p) for p in pids], [cpu_seconds(p) for p in redis_pids]
    used = [sum(a) - sum(b) for a, b in zip(after, before, strict=True)]
    source_s = (source_after.ru_utime + source_after.ru_stime) - (source.ru_utime + source.ru_stime)
    return Point(rate, used[0] / messages * 1000, used[1] / messages * 1000, source_s / messages * 1000)


def durable(redis_url: str, redis_pids: list[int], workers: int, conns: int, messages: int) -> Point:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), FALLBACK_LOG_LEVEL="WARNING",
               FALLBACK_MAX_CONNECTIONS_PER_IP="1000", FALLBACK_MAX_COMMANDS="1000000",
               FALLBACK_MAX_MESSAGES_PER_IP_PER_MINUTE="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fallback", "smtp", "--redis-url", redis_url, "--smtp-port", str(port),
         "--smtp-workers", str(workers), "--hostname", "bench.test"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(1.5)  # the other processes bind a moment after the first
        return measure(port, conns, messages, [proc.pid, *children(proc.pid)], redis_pids)
    finally:
        stop_pid(proc)


def noop(workers: int, conns: int, messages: int) -> Point:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve-noop", str(port)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL) for _ in range(workers)]
    try:
        wait_port(port)
        time.sleep(1.0)
        return measure(port, conns, messages, [p.pid for p in procs])
    finally:
        for proc in procs:
            stop_pid(proc)


def sink(conns: int, messages: int) -> Point:
    port = free_port()
    proc = smtp_ingest.start_server("sink", port)
    try:
        return measure(port, conns, messages, [proc.pid])
    finally:
        stop_pid(proc)


async def _store_loop(redis_url: str, messages: int, concurrency: int) -> tuple[float, float]:
    """(messages/s, client CPU ms per message) of delivery.deliver_async with the receiver's batcher."""

    r = redisconn.async_client(redis_url)
    batcher = DeliveryBatcher(r)
    raw = b"From: a@remote.test\r\nTo: " + smtp_ingest.RCPT.encode() + b"\r\nSubject: x\r\n\r\n" + b"x" * 4000
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await delivery.deliver_async(r, [delivery.Delivery(smtp_ingest.RCPT, "default")], f"s{i}", raw,
                                      batcher=batcher)

    try:
        await asyncio.gather(*(one(i) for i in range(200)))  # warm-up
        t0, c0 = time.monotonic(), time.process_time()
        await asyncio.gather(*(one(i) for i in range(200, 200 + messages)))
        took, cpu = time.monotonic() - t0, time.process_time() - c0
    finally:
        await r.aclose()
    return messages / took, cpu / messages * 1000


def store_only(backends: dict[str, str], messages: int) -> None:
    """The receiver's write alone, in this process: `delivery.deliver_async` through a
    DeliveryBatcher, 50 at a time, 4 KiB (on a cluster the status counters ride along
    with the next batch)."""
    print(f"delivery.deliver_async alone, in-process, 50 concurrent, 4 KiB, {messages} messages:")
    for name, url in backends.items():
        rate, cpu = asyncio.run(_store_loop(url, messages, 50))
        print(f"  {name}: {rate:,.0f} msg/s, client CPU {cpu:.3f} ms/msg")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve-noop", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, default=3000, help="messages per point (default 3000)")
    ap.add_argument("--workers", default="1,2", help="receiver processes to try (default 1,2)")
    ap.add_argument("--concurrency", default="50", help="smtp-source connections (default 50)")
    ap.add_argument("--cluster", action="store_true", help="also intake into a 3+3 node Redis Cluster")
    ap.add_argument("--cluster-only", action="store_true", help="only the Redis Cluster")
    ap.add_argument("--store-only", action="store_true",
                    help="measure only the receiver's Redis write, in-process (no SMTP)")
    args = ap.parse_args()
    if args.serve_noop:
        asyncio.run(smtp_ingest.serve_noop(args.serve_noop, reuse_port=True))
        return 0
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-workers-"))
    backends: dict[str, str] = {}
    redis_pids: dict[str, list[int]] = {}
    servers: list[RedisServer | RedisClusterServers] = []
    try:
        if not args.cluster_only:
            single = RedisServer(work / "redis").start()
            servers.append(single)
            backends["redis"] = single.url
            redis_pids["redis"] = [single.proc.pid] if single.proc else []
        if args.cluster or args.cluster_only:
            cluster = RedisClusterServers(work / "cluster").start()
            servers.append(cluster)
            backends["cluster"] = cluster.url
            redis_pids["cluster"] = [n.proc.pid for n in cluster.nodes if n.proc]
        for url in backends.values():
            provision(url)
        if args.store_only:
            store_only(backends, args.messages)
            return 0
        workers = [int(w) for w in args.workers.split(",")]
        print(f"4 KiB messages, {args.messages} per point after 200 of warm-up; smtp-source -d; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              "backends: " + ", ".join(backends))
        print(f"{'conns':>5} {'procs':>5} {'sink/s':>7} {'no-op/s':>8} "
              + "".join(f"{name + '/s':>10} {name + '/no-op':>14} {name + '/sink':>13}" for name in backends))
        best: dict[str, float] = {}
        cpu_lines: list[str] = []
        for conns in (int(c) for c in args.concurrency.split(",")):
            sunk = sink(conns, args.messages)
            for n in workers:
                base = noop(n, conns, args.messages)
                line = f"{conns:>5} {n:>5} {sunk.rate:>7.0f} {base.rate:>8.0f} "
                cpu = f"{conns:>5} {n:>5} {sunk.source_ms:>7.2f} {sunk.cpu_ms:>7.2f} {base.cpu_ms:>8.2f} "
                for name, url in backends.items():
                    point = durable(url, redis_pids[name], n, conns, args.messages)
                    best[name] = max(best.get(name, 0.0), point.rate)
                    line += (f"{point.rate:>10.0f} {point.rate / base.rate:>14.2f} "
                             f"{point.rate / sunk.rate:>13.2f}")
                    cpu += (f"{point.cpu_ms:>10.2f} {point.redis_ms:>14.2f} "
                            f"{point.cpu_ms / base.cpu_ms:>13.2f}")
                print(line, flush=True)
                cpu_lines.append(cpu)
        print(f"\nCPU ms per message (from /proc; load average now {os.getloadavg()[0]:.1f}):")
        print(f"{'conns':>5} {'procs':>5} {'source':>7} {'sink':>7} {'no-op':>8} "
              + "".join(f"{name:>10} {name + ' redis':>14} {name + '/no-op':>13}" for name in backends))
        print("\n".join(cpu_lines))
        for name, url in backends.items():
            print(f"{name}: {stored(url):,} messages stored; best {best[name]:,.0f} msg/s: target "
                  f">= {TARGET:,.0f} {'met' if best[name] >= TARGET else 'MISSED'}")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
