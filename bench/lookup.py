"""RCPT-time directory lookups, the old text record against issue 17's binary one, same run.

Starts a stock `redis-server` (default configuration, `--save "" --appendonly no`) on a free
port, writes M mailboxes (default 100,000, bcrypt hashes) twice into the same directory: one
half as records of the text form written before issue 17 ("mailstore<TAB>hash"), the other
half through Directory.put_many (the binary form).  Then it resolves N recipients (default
20,000 per round) of each half through the receiver's real code path
(fallback.intake.addressing.resolve_async on an asyncio Redis client, as at RCPT, and
directory.lookup_async as routing uses it), rounds interleaved old/new, and prints lookups per
second per round, the medians and new/old (>= 1.0 means not slower).  The decoding function
alone (Mailbox.decode of each form) is timed the same way.

    .venv/bin/python bench/lookup.py
    .venv/bin/python bench/lookup.py --mailboxes 20000 --lookups 5000 --rounds 3   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provision import fake_bcrypt_hashes  # noqa: E402
from fallback import keys  # noqa: E402
from fallback.intake import addressing  # noqa: E402
from fallback.mailbox import directory  # noqa: E402
from tests.servers import free_port, stop_pid  # noqa: E402

BUCKETS = 65536


def start_stock(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(300):
        try:
            if int(client.info("server")["process_id"]) == proc.pid:
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def load(r: redis.Redis, m: int) -> tuple[list[str], list[str]]:
    """(old-form addresses, new-form addresses), m/2 each."""
    hashes = fake_bcrypt_hashes(m)
    olds = [f"old{i:07d}@d{i % 100}.example.com" for i in range(m // 2)]
    news = [f"new{i:07d}@d{i % 100}.example.com" for i in range(m // 2)]
    r.hset(keys.DIR_META, "buckets", BUCKETS)  # fixed as this bench writes and reads them
    pipe = r.pipeline(transaction=False)
    for i, address in enumerate(olds):
        pipe.hset(keys.dir_bucket(address, BUCKETS), address, f"store{i % 4}\t{hashes[i]}")
    pipe.execute()
    d = directory.Directory(r, directory.ensure_buckets(r, BUCKETS))
    d.put_many((directory.Mailbox(a, f"store{i % 4}", hashes[m // 2 + i]), None) for i, a in enumerate(news))
    r.hset(keys.DIR_DOMAINS, mapping={f"d{i}.example.com": m // 100 for i in range(100)})
    return olds, news


BLOCK = 100  # lookups of one form before the other form's: the machine's drift falls on both


async def rcpt_round(ar: aioredis.Redis, picks: list[list[str]], policy: addressing.Policy) -> list[float]:
    spent = [0.0, 0.0]
    for start in range(0, len(picks[0]), BLOCK):
        for which in (0, 1) if start // BLOCK % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            for address in picks[which][start:start + BLOCK]:
                found = await addressing.resolve_async(ar, BUCKETS, address, policy)
                assert found is not None and found.mailboxes
            spent[which] += time.perf_counter() - t0
    return [len(picks[0]) / t for t in spent]


async def routing_round(ar: aioredis.Redis, picks: list[list[str]]) -> list[float]:
    spent = [0.0, 0.0]
    for start in range(0, len(picks[0]), BLOCK):
        for which in (0, 1) if start // BLOCK % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            for address in picks[which][start:start + BLOCK]:
                assert await directory.lookup_async(ar, BUCKETS, address) is not None
            spent[which] += time.perf_counter() - t0
    return [len(picks[0]) / t for t in spent]


def decode_round(values: list[list[tuple[str, bytes]]]) -> list[float]:
    spent = [0.0, 0.0]
    for _ in range(20):
        for which in (0, 1):
            t0 = time.perf_counter()
            for address, value in values[which]:
                directory.Mailbox.decode(address, value)
            spent[which] += time.perf_counter() - t0
    return [20 * len(values[0]) / t for t in spent]


def report(what: str, old: list[float], new: list[float]) -> None:
    ratios = [n / o for o, n in zip(old, new, strict=True)]
    print(f"{what}: old {statistics.median(old):,.0f}/s, new {statistics.median(new):,.0f}/s; "
          f"new/old median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")


async def measure(url: str, olds: list[str], news: list[str], n: int, rounds: int) -> None:
    ar = aioredis.Redis.from_url(url)
    policy = addressing.Policy()
    r = redis.Redis.from_url(url)
    results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ("rcpt", "routing", "decode")}
    rng = random.Random(17)
    for k in range(rounds):
        picks = [rng.sample(olds, n), rng.sample(news, n)]
        values = [[(a, r.hget(keys.dir_bucket(a, BUCKETS), a) or b"") for a in p[:5000]] for p in picks]
        for name, got in (("rcpt", await rcpt_round(ar, picks, policy)),
                          ("routing", await routing_round(ar, picks)), ("decode", decode_round(values))):
            for which in (0, 1):
                results[name][which].append(got[which])
        print(f"round {k + 1}: rcpt old {results['rcpt'][0][-1]:,.0f}/s new {results['rcpt'][1][-1]:,.0f}/s")
    await ar.aclose()
    r.close()
    report("RCPT resolve_async", *results["rcpt"])
    report("routing lookup_async", *results["routing"])
    report("Mailbox.decode alone", *results["decode"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mailboxes", type=int, default=100_000)
    ap.add_argument("--lookups", type=int, default=20_000, help="per form per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-lookup-"))
    proc, url = start_stock(work)
    try:
        r = redis.Redis.from_url(url)
        olds, news = load(r, args.mailboxes)
        enc = {r.object("encoding", keys.dir_bucket(a, BUCKETS)) for a in olds[:200]}
        enc_new = {r.object("encoding", keys.dir_bucket(a, BUCKETS)) for a in news[:200]}
        print(f"stock redis-server: {args.mailboxes:,} mailboxes; bucket encodings seen by old-form "
              f"records {sorted(e.decode() for e in enc if e)}, "
              f"new-form {sorted(e.decode() for e in enc_new if e)}")
        r.close()
        asyncio.run(measure(url, olds, news, min(args.lookups, len(news)), args.rounds))
    finally:
        stop_pid(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
