"""Reconcile throughput against a bare aioimaplib APPEND loop, into the same private Dovecot.

    .venv/bin/python bench/reconcile.py [--messages 2000] [--size 4096] [--users 8,50]
                                        [--concurrency 8] [--rounds 3]

For each user count, the same number of 4 KiB messages is (a) stored in Redis
and reconciled by `fallback.reconcile.reconciler.Reconciler` -- state machine, Redis
round trips and all -- and (b) appended by a bare loop: the same master login,
the same APPEND with flags and INTERNALDATE, the same number of parallel
connections, and nothing else.  Rounds alternate between the two, each into
fresh mailboxes.  Printed: the best round of each and their ratio, and the median
of the ratios of back-to-back pairs (less sensitive to load that changes
between rounds on a shared machine).  Needs redis-server and
dovecot (deploy/install-deps.sh test).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aioimaplib
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fallback.config import load_settings
from fallback.ids import new_id
from fallback.mailbox import delivery, fields, received
from fallback.reconcile.imap import quote
from fallback.reconcile.reconciler import Reconciler
from fallback.redisconn import async_client
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer
from tests.servers import RedisServer


def make_raw(address: str, n: int, size: int) -> tuple[str, bytes]:
    msg_id = new_id()
    head = received.received_header(msg_id, "fallback.bench", "mx.bench", "192.0.2.1", None, "ESMTP", address)
    head += f"From: a@remote.test\r\nTo: {address}\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return msg_id, head + body


async def bare_loop(port: int, work: dict[str, list[tuple[str, bytes]]], concurrency: int) -> None:
    """The baseline: log in per user and APPEND each message, nothing else."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for user in work:
        queue.put_nowait(user)
    when = dt.datetime.now(dt.UTC)

    async def worker() -> None:
        while not queue.empty():
            user = queue.get_nowait()
            client = aioimaplib.IMAP4("127.0.0.1", port, timeout=60)
            await client.wait_hello_from_server()
            res = await client.login(quote(f"{user}*{MASTER_USER}"), MASTER_PASSWORD)
            assert res.result == "OK", res
            for _, raw in work[user]:
                res = await client.append(raw, mailbox="INBOX", flags="(\\Seen)", date=when)
                assert res.result == "OK", res
            await client.logout()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(work)))))


async def reconcile_run(settings, users: list[str]) -> None:  # type: ignore[no-untyped-def]
    r = async_client(settings.redis_url)
    try:
        report = await Reconciler(settings, r, MASTER_PASSWORD).run(users)
    finally:
        await r.aclose()
    assert report.ok, report.totals()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--users", default="8,50")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fallback-bench-"))
    rs = RedisServer(tmp / "redis").start()
    dovecot = DovecotServer(Path(tempfile.mkdtemp(prefix="fallback-dovecot-")))
    user_counts = [int(x) for x in args.users.split(",")]

    def names(kind: str, rnd: int, nusers: int) -> list[str]:
        return [f"{kind}{rnd}-{nusers}-{u}@bench.test" for u in range(nusers)]

    # Every user known before Dovecot starts: no passwd-file re-reads while measuring.
    for nusers in user_counts:
        for rnd in range(args.rounds):
            for kind in ("bare", "reconcile"):
                dovecot.add_users(names(kind, rnd, nusers))
    dovecot.start()
    r = redis.Redis.from_url(rs.url)
    pw = tmp / "pw"
    pw.write_text(MASTER_PASSWORD + "\n")
    settings = load_settings({"redis_url": rs.url, "imap_url": dovecot.url, "master_user": MASTER_USER,
                              "master_password_file": str(pw)}, env={})
    settings = replace(settings, reconcile_concurrency=args.concurrency)
    print(f"reconcile benchmark: {args.messages} messages of {args.size} bytes, concurrency "
          f"{args.concurrency}, best of {args.rounds} rounds; Dovecot {dovecot.url}, Redis {rs.url} "
          "(appendfsync always)")
    print(f"{'users':>6} {'bare APPEND msg/s':>18} {'reconcile msg/s':>16} {'ratio':>6} "
          f"{'median ratio of pairs':>22}")
    try:
        for nusers in user_counts:
            best = {"bare": 0.0, "reconcile": 0.0}
            pairs: list[float] = []
            for rnd in range(args.rounds):
                for kind in ("bare", "reconcile"):
                    users = names(kind, rnd, nusers)
                    per_user: dict[str, list[tuple[str, bytes]]] = {u: [] for u in users}
                    for n in range(args.messages):
                        u = users[n % nusers]
                        per_user[u].append(make_raw(u, n, args.size))
                    if kind == "reconcile":
                        now_ms = int(time.time() * 1000)
                        for u, msgs in per_user.items():
                            with r.pipeline(transaction=False) as pipe:
                                for msg_id, raw in msgs:
                                    d = delivery.Delivery(u, "default", flags=(fields.SEEN,))
                                    delivery.queue_delivery(pipe, d, msg_id, raw, {}, now_ms)
                                pipe.execute()
                    started = time.perf_counter()
                    if kind == "bare":
                        asyncio.run(bare_loop(dovecot.port, per_user, args.concurrency))
                    else:
                        asyncio.run(reconcile_run(settings, users))
                    rate = args.messages / (time.perf_counter() - started)
                    best[kind] = max(best[kind], rate)
                    if kind == "bare":
                        bare_rate = rate
                    else:
                        pairs.append(rate / bare_rate)
            print(f"{nusers:>6} {best['bare']:>18,.0f} {best['reconcile']:>16,.0f} "
                  f"{best['reconcile'] / best['bare']:>6.2f} {statistics.median(pairs):>22.2f}")
    finally:
        dovecot.stop()
        rs.stop()
        shutil.rmtree(dovecot.workdir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
