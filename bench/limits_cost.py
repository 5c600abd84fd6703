"""What the limits against a hostile Internet cost the durable receiver (issue 13).

Two durable receivers (the SMTP part of `fallback up`, as in bench/smtp_ingest.py),
each storing into its own fresh redis-server with `appendfsync always`, are sent
the same load by Postfix's `smtp-source`, alternating round by round so both
see the same machine:

- limits on: the default mailbox quota checked in every delivery, the memory
  reserve checked against a Redis `maxmemory`, and the per-client message rate
  counted for every MAIL (its limit set high enough that the bench is never
  refused: the cost of counting is what is measured, not the refusals);
- limits off: `mailbox_quota 0`, `max_messages_per_ip_per_minute 0`, and a
  Redis without `maxmemory`, so the memory reserve has nothing to compare with.

Prints messages/s of each and the on/off ratio (target: >= 0.95).

    .venv/bin/python bench/limits_cost.py                       # 4 KiB, 10 and 50 connections
    .venv/bin/python bench/limits_cost.py --rounds 5 --messages 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.smtp_ingest import RCPT, SIZES, drive, provision  # noqa: E402
from tests.servers import RedisServer, free_port, stop_pid, wait_port  # noqa: E402

LIMITS_ON = {"mailbox_quota": "2GiB", "memory_reserve": "90%",
             "max_messages_per_ip_per_minute": 10_000_000}
LIMITS_OFF = {"mailbox_quota": 0, "max_messages_per_ip_per_minute": 0}


async def serve(port: int, redis_url: str, mail_log: str, overrides: dict[str, object]) -> None:
    from fallback.cli import setup_logging
    from fallback.config import load_settings
    from fallback.mailbox import directory
    from fallback.redisconn import async_client
    from fallback.service import SmtpComponent

    flags: dict[str, object] = {"redis_url": redis_url, "smtp_port": port, "hostname": "bench.test",
                                "smtp_workers": 1, "mail_log": mail_log,
                                "max_connections_per_ip": 1000, "max_commands": 1_000_000}
    flags.update({k: str(v) for k, v in overrides.items()})
    settings = load_settings(flags, env={})
    setup_logging(settings)
    r = async_client(redis_url)
    buckets = await directory.ensure_buckets_async(r, settings.directory_buckets)
    component = SmtpComponent(settings, r, buckets, url=redis_url)
    await component.start()
    await asyncio.Event().wait()


def start(port: int, redis_url: str, mail_log: Path, overrides: dict[str, object]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), redis_url, str(mail_log),
                             json.dumps(overrides)], stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, default=2000, help="messages per point and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per point")
    ap.add_argument("--size", default="4KiB", choices=sorted(SIZES))
    ap.add_argument("--concurrency", default="10,50")
    args = ap.parse_args()
    if args.serve:
        port, url, log, overrides = args.serve
        asyncio.run(serve(int(port), url, log, json.loads(overrides)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="fallback-bench-limits-"))
    # The "on" Redis has a maxmemory for the reserve to be a share of; the bench stores
    # far less than it.
    redises = {"on": RedisServer(work / "redis-on", extra=["--maxmemory", "8gb"]).start(),
               "off": RedisServer(work / "redis-off").start()}
    procs = {}
    ports = {}
    try:
        for kind, overrides in (("on", LIMITS_ON), ("off", LIMITS_OFF)):
            provision(redises[kind].url)
            ports[kind] = free_port()
            procs[kind] = start(ports[kind], redises[kind].url, work / f"{kind}-mail.log", overrides)
        print(f"{args.size} messages, {args.messages} per round, {args.rounds} rounds alternating; "
              f"limits on: {LIMITS_ON}; off: {LIMITS_OFF}")
        print(f"{'conns':>5} {'on/s (median)':>14} {'off/s (median)':>15} {'on/off':>7}")
        size = SIZES[args.size]
        for sessions in (int(c) for c in args.concurrency.split(",")):
            rates: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(args.rounds):
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                for kind in order:
                    rates[kind].append(drive(ports[kind], size, sessions, args.messages))
            on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
            print(f"{sessions:>5} {on:>14.0f} {off:>15.0f} {on / off:>7.2f}   "
                  f"(on {', '.join(f'{x:.0f}' for x in rates['on'])}; "
                  f"off {', '.join(f'{x:.0f}' for x in rates['off'])})", flush=True)
        import redis

        for kind, server in redises.items():
            r = redis.Redis.from_url(server.url)
            stored = r.zcard("mbx:{" + RCPT + "}:f:INBOX")
            used = r.info("memory")["used_memory_human"]
            print(f"limits {kind}: {stored} messages stored, used_memory {used}")
            r.close()
    finally:
        for proc in procs.values():
            stop_pid(proc)
        for server in redises.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
