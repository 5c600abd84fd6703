"""What the limits against a hostile Internet cost the durable receiver (issue 13).

Two durable receivers (the SMTP part of `fallback up`, as in bench/smtp_ingest.py),
storing into the same fresh redis-server (`appendfsync always`, a `maxmemory`
of 8 GB), are sent the same load by Postfix's `smtp-source`, alternating
round by round so both see the same machine and the same disk:

- limits on: the default mailbox quota checked at RCPT and in every
  delivery, the memory reserve at 90 % of maxmemory, and the per-client
  message rate counted for every message (its limit set high enough that
  the bench is never refused: the cost of counting is measured, not the
  refusals);
- limits off: `mailbox_quota 0`, `max_messages_per_ip_per_minute 0`, and a
  memory reserve far above maxmemory (the reserve cannot be switched off
  while Redis has a maxmemory; its cost, one INFO a second, is in both).

Prints messages/s of each and the on/off ratio (*: the median of the rounds'
on/off pairs; target: >= 0.95), and the
receiver's CPU time per message (user + system, from /proc), whose off/on
ratio is the steadier figure on a machine where fsync times wander.

    .venv/bin/python bench/limits_cost.py                       # 4 KiB, 10 and 50 connections
    .venv/bin/python bench/limits_cost.py --rounds 5 --messages 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
LIMITS_OFF = {"mailbox_quota": 0, "max_messages_per_ip_per_minute": 0, "memory_reserve": "1024GiB"}


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, default=2000, help="messages per point and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per point")
    ap.add_argument("--size", default="4KiB", choices=sorted(SIZES))
    ap.add_argument("--concurrency", default="10,50")
    ap.add_argument("--on", metavar="JSON", help="settings of the 'on' receiver instead of all the "
                    "limits, to find which one costs what (e.g. '{\"mailbox_quota\": \"2GiB\"}')")
    args = ap.parse_args()
    if args.serve:
        port, url, log, overrides = args.serve
        asyncio.run(serve(int(port), url, log, json.loads(overrides)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="fallback-bench-limits-"))
    # A maxmemory for the reserve to be a share of; the bench stores far less than it.
    redis_server = RedisServer(work / "redis", extra=["--maxmemory", "8gb"]).start()
    provision(redis_server.url)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    limits_on = {**LIMITS_OFF, **json.loads(args.on)} if args.on else LIMITS_ON
    settings = {"on": limits_on, "off": LIMITS_OFF}

    def restart() -> None:
        """Both receivers started anew for each round: a process that happened to share a
        core with redis-server for a whole run would otherwise bias every round of it."""
        for kind in ("on", "off"):
            if kind in procs:
                stop_pid(procs[kind])
            ports[kind] = free_port()
            procs[kind] = start(ports[kind], redis_server.url, work / f"{kind}-mail.log", settings[kind])

    try:
        print(f"{args.size} messages, {args.messages} per round, {args.rounds} rounds alternating; "
              f"limits on: {limits_on}; off: {LIMITS_OFF}")
        print(f"{'conns':>5} {'on/s (median)':>14} {'off/s (median)':>15} {'on/off*':>7} "
              f"{'on µs/msg':>10} {'off µs/msg':>11} {'cpu off/on':>12}")
        size = SIZES[args.size]
        for sessions in (int(c) for c in args.concurrency.split(",")):
            rates: dict[str, list[float]] = {"on": [], "off": []}
            cpu: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(args.rounds):
                restart()
                for kind in ("on", "off"):  # a short warm-up of each fresh process
                    drive(ports[kind], size, sessions, sessions * 10)
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                for kind in order:
                    before = cpu_seconds(procs[kind].pid)
                    rates[kind].append(drive(ports[kind], size, sessions, args.messages))
                    cpu[kind].append((cpu_seconds(procs[kind].pid) - before) / args.messages * 1e6)
            on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
            cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
            # Each round's on/off pair saw the same moment of the machine: their ratios'
            # median is steadier than the ratio of the medians.
            paired = statistics.median(a / b for a, b in zip(rates["on"], rates["off"], strict=True))
            print(f"{sessions:>5} {on:>14.0f} {off:>15.0f} {paired:>7.2f} {cpu_on:>10.0f} "
                  f"{cpu_off:>11.0f} {cpu_off / cpu_on:>12.2f}   "
                  f"(on {', '.join(f'{x:.0f}' for x in rates['on'])}; "
                  f"off {', '.join(f'{x:.0f}' for x in rates['off'])})", flush=True)
        import redis

        r = redis.Redis.from_url(redis_server.url)
        print(f"{r.zcard('mbx:{' + RCPT + '}:f:INBOX')} messages stored, "
              f"used_memory {r.info('memory')['used_memory_human']}")
        r.close()
    finally:
        for proc in procs.values():
            stop_pid(proc)
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
