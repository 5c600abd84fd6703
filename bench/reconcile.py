"""Reconcile throughput against a bare aioimaplib APPEND loop and against a migration tool.

    .venv/bin/python bench/reconcile.py [--messages 2000] [--size 4096] [--users 8,50]
                                        [--concurrency 8] [--rounds 5] [--peer-rounds 5]
                                        [--skip-pairs] [--skip-peer] [--profile FILE]

(a) Pairs.  For each user count, the same number of 4 KiB messages is (1)
appended by a bare loop: the same master login, `APPEND INBOX (\\Seen) date
{N}` through aioimaplib's own append(), the same number of parallel
connections, nothing else; (2) stored in Redis and reconciled by
`fallback.reconcile.reconciler.Reconciler` -- state machine, Redis round trips
and all -- with the default `reconcile_append_batch` (MULTIAPPEND); (3) the
same with `reconcile_append_batch = 1` and `reconcile_mailbox_connections = 1`
(one APPEND per message, one connection per mailbox: reconcile before issue
17).  Each round runs the three into fresh mailboxes of the same Dovecot,
back to back, in an order rotated every round; printed per user count: the
median rate of each, the median of the per-round ratios against the bare
loop and their spread (min-max).

(b) Peer.  A second private Dovecot holds one account with the same number of
messages (filled by APPEND).  Each round the migration tool copies that
account into a fresh account of the first Dovecot -- `imapsync` when it is on
PATH, else `mbsync` (Debian `isync`): Debian 12 has no imapsync package -- and
`fallback reconcile --user` (the CLI, a whole process like the tool's)
reconciles the same messages' bytes from Redis into another fresh account,
as does the same command with one APPEND per message over one connection (before);
the wall time of each whole process is the measure.  Printed: messages per
second of each (median, spread) and the median ratio of the rounds.

`--profile FILE`: one extra reconcile (`--profile-users`, 8) under cProfile; the top of it
by own time is printed and the stats written to FILE.

The machine may be shared: several interleaved rounds, medians and spreads.
Needs redis-server and dovecot (deploy/install-deps.sh test) and the peer tool
(`make bench-deps`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import imaplib
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aioimaplib
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fallback.config import Settings, load_settings
from fallback.ids import new_id
from fallback.mailbox import delivery, fields, received
from fallback.reconcile.imap import quote
from fallback.reconcile.reconciler import Reconciler
from fallback.redisconn import async_client
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
USER_PASSWORD = "user-password"   # every user of tests/dovecot.py's passwd-file
Work = dict[str, list[tuple[str, bytes]]]


def make_raw(address: str, n: int, size: int) -> tuple[str, bytes]:
    msg_id = new_id()
    head = received.received_header(msg_id, "fallback.bench", "mx.bench", "192.0.2.1", None, "ESMTP", address)
    head += f"From: a@remote.test\r\nTo: {address}\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return msg_id, head + body


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


# -- (a) the bare loop against reconcile ---------------------------------------------------------

async def bare_loop(port: int, work: Work, concurrency: int) -> None:
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


async def reconcile_run(settings: Settings, users: list[str]) -> None:
    r = async_client(settings.redis_url or "")
    try:
        report = await Reconciler(settings, r, MASTER_PASSWORD).run(users)
    finally:
        await r.aclose()
    assert report.ok, report.totals()
    assert sum(m.appended for m in report.mailboxes.values()) > 0


def store(r: redis.Redis, work: Work) -> None:
    now_ms = int(time.time() * 1000)
    for u, msgs in work.items():
        with r.pipeline(transaction=False) as pipe:
            for msg_id, raw in msgs:
                d = delivery.Delivery(u, "default", flags=(fields.SEEN,))
                delivery.queue_delivery(pipe, d, msg_id, raw, {}, now_ms)
            pipe.execute()


def spread_work(users: list[str], messages: int, size: int) -> Work:
    work: Work = {u: [] for u in users}
    for n in range(messages):
        u = users[n % len(users)]
        work[u].append(make_raw(u, n, size))
    return work


KINDS = ("bare", "reconcile", "reconcile-1")   # reconcile-1: one APPEND per message, one connection


def pairs(args: argparse.Namespace, r: redis.Redis, dovecot: DovecotServer, settings: Settings,
          names: Callable[[str, int, int], list[str]]) -> None:
    single = replace(settings, reconcile_append_batch=1, reconcile_mailbox_connections=1)
    print(f"\n(a) {args.messages} messages of {args.size} bytes, concurrency {args.concurrency}, "
          f"{args.rounds} rounds, order rotated each round; msg/s median (min-max)")
    print(f"{'users':>5} {'bare APPEND':>20} {'reconcile':>20} {'before (1/APPEND)':>20} "
          f"{'reconcile/bare':>18} {'before/bare':>18}")
    for nusers in args.user_counts:
        rates: dict[str, list[float]] = {k: [] for k in KINDS}
        ratios: dict[str, list[float]] = {"reconcile": [], "reconcile-1": []}
        for rnd in range(args.rounds):
            this: dict[str, float] = {}
            order = KINDS[rnd % 3:] + KINDS[:rnd % 3]
            for kind in order:
                users = names(kind, rnd, nusers)
                work = spread_work(users, args.messages, args.size)
                if kind != "bare":
                    store(r, work)
                started = time.perf_counter()
                if kind == "bare":
                    asyncio.run(bare_loop(dovecot.port, work, args.concurrency))
                else:
                    asyncio.run(reconcile_run(settings if kind == "reconcile" else single, users))
                this[kind] = args.messages / (time.perf_counter() - started)
                rates[kind].append(this[kind])
            for kind in ratios:
                ratios[kind].append(this[kind] / this["bare"])
        cells = [f"{statistics.median(rates[k]):,.0f} ({spread(rates[k])})" for k in KINDS]
        rcells = [f"{statistics.median(ratios[k]):.2f} ({spread(ratios[k], '.2f')})" for k in ratios]
        print(f"{nusers:>5} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} {rcells[0]:>18} {rcells[1]:>18}",
              flush=True)


# -- (b) the migration tool against reconcile ---------------------------------------------------

def fill_source(source: DovecotServer, user: str, raws: list[bytes]) -> None:
    imap = imaplib.IMAP4("127.0.0.1", source.port)
    imap.login(user, USER_PASSWORD)
    for raw in raws:
        typ, _ = imap.append("INBOX", "(\\Seen)", None, raw)
        assert typ == "OK"
    imap.logout()


def peer_command(tmp: Path, source: DovecotServer, target: DovecotServer, src: str, dst: str) -> list[str]:
    """The copy of one account by imapsync (if installed) or mbsync, as an operator would run it."""
    if shutil.which("imapsync"):
        return ["imapsync", "--host1", "127.0.0.1", "--port1", str(source.port), "--user1", src,
                "--password1", USER_PASSWORD, "--host2", "127.0.0.1", "--port2", str(target.port),
                "--user2", dst, "--password2", USER_PASSWORD, "--nofoldersizes", "--nolog",
                "--noreleasecheck", "--nossl1", "--nossl2", "--notls1", "--notls2", "--folder", "INBOX"]
    state = tmp / f"mbsync-{dst}"
    state.mkdir()
    conf = state / "mbsyncrc"
    conf.write_text(f"""
IMAPAccount src
Host 127.0.0.1
Port {source.port}
User {src}
Pass {USER_PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore src
Account src

IMAPAccount dst
Host 127.0.0.1
Port {target.port}
User {dst}
Pass {USER_PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore dst
Account dst

Channel copy
Far :src:INBOX
Near :dst:INBOX
Sync Pull
Create Near
CopyArrivalDate yes
SyncState {state}/
""")
    return ["mbsync", "-q", "-c", str(conf), "copy"]


def peer(args: argparse.Namespace, tmp: Path, r: redis.Redis, source: DovecotServer,
         target: DovecotServer, settings: Settings) -> None:
    tool = "imapsync" if shutil.which("imapsync") else "mbsync"
    if not shutil.which(tool):
        print("\n(b) skipped: neither imapsync nor mbsync is installed (make bench-deps)")
        return
    src = "source@bench.test"
    msgs = [make_raw(src, n, args.size) for n in range(args.messages)]
    fill_source(source, src, [raw for _, raw in msgs])
    pw = tmp / "pw"
    print(f"\n(b) {args.messages} messages of {args.size} bytes in one account, {args.peer_rounds} rounds; "
          f"{tool} (Dovecot to Dovecot) vs `fallback reconcile --user` (Redis to Dovecot), whole "
          "processes, msg/s")
    rates: dict[str, list[float]] = {tool: [], "ours": [], "before": []}
    for rnd in range(args.peer_rounds):
        this: dict[str, float] = {}
        kinds = list(rates)
        for kind in kinds[rnd % 3:] + kinds[:rnd % 3]:
            dst = f"{'peer' if kind == tool else kind}{rnd}@bench.test"
            if kind == tool:
                cmd = peer_command(tmp, source, target, src, dst)
            else:
                store(r, {dst: [(new_id(), raw) for _, raw in msgs]})
                cmd = [str(ROOT / ".venv/bin/fallback"), "reconcile", "--user", dst,
                       "--redis-url", settings.redis_url or "", "--imap-url", target.url,
                       "--master-user", MASTER_USER, "--master-password-file", str(pw)]
                if kind == "before":
                    cmd += ["--reconcile-append-batch", "1", "--reconcile-mailbox-connections", "1"]
            started = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, check=False)
            took = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{kind} failed ({done.returncode}): {done.stderr.decode()[-800:]}")
            this[kind] = args.messages / took
        for kind in rates:
            who = f"{'peer' if kind == tool else kind}{rnd}@bench.test"
            got = count_messages(target, who)
            assert got == args.messages, f"{kind} copied {got} of {args.messages}"
            rates[kind].append(this[kind])
    idle = []   # the fixed cost of the command: start-up, imports, preflight login, nothing to do
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([str(ROOT / ".venv/bin/fallback"), "reconcile", "--user", "ours0@bench.test",
                        "--redis-url", settings.redis_url or "", "--imap-url", target.url,
                        "--master-user", MASTER_USER, "--master-password-file", str(pw)],
                       capture_output=True, check=True)
        idle.append(time.perf_counter() - started)
    print(f"`fallback reconcile` with nothing to do: {statistics.median(idle):.2f} s ({spread(idle, '.2f')})")
    for kind, label in ((tool, tool), ("ours", "reconcile"), ("before", "before")):
        ratios = [o / t for o, t in zip(rates[kind], rates[tool], strict=True)]
        print(f"{label:>10}: {statistics.median(rates[kind]):>6,.0f} msg/s ({spread(rates[kind])}); "
              f"/ {tool}: median {statistics.median(ratios):.2f} ({spread(ratios, '.2f')})", flush=True)


def count_messages(server: DovecotServer, user: str) -> int:
    imap = imaplib.IMAP4("127.0.0.1", server.port)
    imap.login(user, USER_PASSWORD)
    _, data = imap.select("INBOX", readonly=True)
    imap.logout()
    return int(data[0] or 0)


# -- the profile ------------------------------------------------------------------------------

def profile(args: argparse.Namespace, r: redis.Redis, settings: Settings, users: list[str]) -> None:
    store(r, spread_work(users, args.messages, args.size))
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(reconcile_run(settings, users))
    prof.disable()
    prof.dump_stats(args.profile)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(f"\nprofile of one reconcile, {args.messages} messages over {len(users)} users "
          f"(stats in {args.profile}):")
    print(out.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--users", default="8,50")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peer-rounds", type=int, default=5)
    ap.add_argument("--skip-pairs", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--profile", metavar="FILE")
    ap.add_argument("--profile-users", type=int, default=8)
    args = ap.parse_args()
    args.user_counts = [int(x) for x in args.users.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="fallback-bench-"))
    rs = RedisServer(tmp / "redis").start()
    dovecot = DovecotServer(Path(tempfile.mkdtemp(prefix="fallback-dovecot-")))
    source = DovecotServer(Path(tempfile.mkdtemp(prefix="fallback-dovecot-src-")))

    def names(kind: str, rnd: int, nusers: int) -> list[str]:
        return [f"{kind}{rnd}-{nusers}-{u}@bench.test" for u in range(nusers)]

    # Every user known before Dovecot starts: no passwd-file re-reads while measuring.
    for nusers in args.user_counts:
        for rnd in range(args.rounds):
            for kind in KINDS:
                dovecot.add_users(names(kind, rnd, nusers))
    dovecot.add_users([f"{k}{n}@bench.test" for n in range(args.peer_rounds)
                       for k in ("peer", "ours", "before")])
    dovecot.add_users(names("profile", 0, args.profile_users))
    source.add_users(["source@bench.test"])
    dovecot.start()
    if not args.skip_peer:
        source.start()
    r = redis.Redis.from_url(rs.url)
    pw = tmp / "pw"
    pw.write_text(MASTER_PASSWORD + "\n")
    settings = load_settings({"redis_url": rs.url, "imap_url": dovecot.url, "master_user": MASTER_USER,
                              "master_password_file": str(pw)}, env={})
    settings = replace(settings, reconcile_concurrency=args.concurrency)
    load = os.getloadavg()
    print(f"reconcile benchmark at {time.strftime('%H:%M UTC', time.gmtime())}, load average "
          f"{load[0]:.1f} on {os.cpu_count()} CPUs; Dovecot {dovecot.url}, Redis {rs.url} "
          f"(appendfsync always), reconcile_append_batch {settings.reconcile_append_batch}")
    try:
        if not args.skip_pairs:
            pairs(args, r, dovecot, settings, names)
        if not args.skip_peer:
            peer(args, tmp, r, source, dovecot, settings)
        if args.profile:
            profile(args, r, settings, names("profile", 0, args.profile_users))
    finally:
        for server in (dovecot, source):
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)
        rs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
