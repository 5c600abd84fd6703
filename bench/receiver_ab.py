"""The durable receiver of two checkouts, before and after a change, under the same load.

Each checkout has its own virtualenv (`python3 -m venv .venv && .venv/bin/pip
install -e ".[test,bench]"`).  Every round starts a fresh redis-server
(`appendfsync always`) and, one after the other in alternating order, each
checkout's receiver as it is in bench/smtp_ingest.py (`--serve durable` or
`--serve lean`), which gets a short warm-up and then Postfix's `smtp-source`
load.  The receivers are started anew every round: on a small machine a
process that shares a core with redis-server for a whole run is slower for
all of it, and comparing two long-lived processes measures that, not the
code.  Prints messages/s and the receiver's CPU time per message (user +
system, /proc) of each, and the medians of the rounds' after/before pairs.

    git worktree add /tmp/before HEAD~3   # or a clone at the commit before
    .venv/bin/python bench/receiver_ab.py --before /tmp/before --after . --kind durable --conns 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.smtp_ingest import SIZES, drive, provision  # noqa: E402
from tests.servers import RedisServer, free_port, stop_pid, wait_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code before")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout of the code after (this one)")
    ap.add_argument("--kind", choices=("durable", "lean"), default="durable")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--size", choices=sorted(SIZES), default="4KiB")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--new-connections", action="store_true",
                    help="one new connection per message (smtp-source without -d)")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / ".venv" / "bin" / "python").exists():
            print(f"receiver_ab: {name} checkout {tree} has no .venv", file=sys.stderr)
            return 2
    size = SIZES[args.size]
    rates: dict[str, list[float]] = {t: [] for t in trees}
    cpu: dict[str, list[float]] = {t: [] for t in trees}
    for i in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="fallback-bench-ab-"))
        redis_server = RedisServer(work / "redis").start()
        try:
            provision(redis_server.url)
            for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
                port = free_port()
                proc = subprocess.Popen(
                    [str(trees[name] / ".venv/bin/python"), str(trees[name] / "bench/smtp_ingest.py"),
                     "--serve", args.kind, str(port), redis_server.url, str(work / f"{name}.log")],
                    stdout=subprocess.DEVNULL)
                try:
                    wait_port(port)
                    keep = not args.new_connections
                    drive(port, size, args.conns, args.conns * 10, keep=keep)
                    before = cpu_seconds(proc.pid)
                    rates[name].append(drive(port, size, args.conns, args.messages, keep=keep))
                    cpu[name].append((cpu_seconds(proc.pid) - before) / args.messages * 1e6)
                finally:
                    stop_pid(proc)
        finally:
            redis_server.stop()
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.kind} receiver, {args.size}, {args.conns} connections"
          f"{' (a new one per message)' if args.new_connections else ''}, {args.rounds} rounds of "
          f"{args.messages} messages")
    for name in trees:
        each = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"{name:>6}: {statistics.median(rates[name]):8.0f} msg/s (median), "
              f"{statistics.median(cpu[name]):5.0f} µs CPU/msg; rounds {each}")
    ratio = statistics.median(a / b for a, b in zip(rates["after"], rates["before"], strict=True))
    cpu_ratio = statistics.median(a / b for a, b in zip(cpu["after"], cpu["before"], strict=True))
    print(f"after/before: throughput {ratio:.2f}, CPU per message {cpu_ratio:.2f} (medians of the pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
