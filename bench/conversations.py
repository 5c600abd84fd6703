"""Conversations and address suggestions on a 10,000-message mailbox: what a page pays for them.

A fresh redis-server configured like the embedded one (AOF, appendfsync
always); one mailbox filled through the receiver's own scripted write
(`delivery.deliver_async`, the DELIVER_LUA call a 250 waits for) with
10,000 messages in conversations of 1 to 12 (replies carry In-Reply-To and
References, some only a "Re:"/"AW:" subject), a tenth of them the user's own
replies in Sent, from 400 people; a directory of 100,000 users in the
user's domain (plus 20,000 in another), provisioned with Directory.put_many
so that the name index is written as provisioning writes it.

Measured in-process with the Flask test client (the same app gunicorn
serves), each over many requests, median and p95, and as a ratio to
`GET /healthz` measured the same way in the same run:

- the one-off catch-up of the conversation index over the whole mailbox
  (what the first page after an upgrade pays), then a catch-up with nothing
  new (what every later page pays);
- the message page (`/message/<id>`), and the conversation part alone
  (web.conversations.for_message);
- `/contacts?q=` for prefixes of 1 to 4 characters typed as a user types.

    .venv/bin/python bench/conversations.py                      # 10,000 messages
    .venv/bin/python bench/conversations.py --messages 2000 --requests 200   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import string
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fallback import keys  # noqa: E402
from fallback.config import load_settings  # noqa: E402
from fallback.ids import new_id  # noqa: E402
from fallback.mailbox import delivery, directory, fields, threads  # noqa: E402
from fallback.redisconn import async_client  # noqa: E402
from tests.servers import RedisServer  # noqa: E402
from web import conversations, create_app  # noqa: E402
from web.sessions import COOKIE  # noqa: E402

USER = "user@example.com"
SECRET = "bench-secret-not-for-production-0123456789abcdef"
FIRST = ["Ann", "Bert", "Chloé", "Dana", "Emil", "Fatima", "Greta", "Hugo", "Ines", "Jon", "Karin",
         "Luca", "Mia", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara"]
LAST = ["Meyer", "Dubois", "García", "Rossi", "Novak", "Jensen", "Kowalski", "Silva", "Smith", "Weber"]


def people(n: int) -> list[tuple[str, str]]:
    rnd = random.Random(7)
    out = []
    for i in range(n):
        first, last = rnd.choice(FIRST), rnd.choice(LAST)
        out.append((f"{first} {last}", f"{first.lower()[:3]}{last.lower()[:4]}{i}@remote{i % 17}.test"))
    return out


def plan(n: int) -> list[tuple[str, str, bytes]]:
    """(folder, kind, raw) of n messages in conversations, oldest first."""
    rnd = random.Random(11)
    folks = people(400)
    out: list[tuple[str, str, bytes]] = []
    conv = 0
    while len(out) < n:
        conv += 1
        size = rnd.choice([1, 1, 1, 2, 2, 3, 4, 6, 8, 12])
        subject = f"Topic {conv}: {rnd.choice(['budget', 'outage', 'trip', 'hiring', 'release'])}"
        refs: list[str] = []
        for k in range(size):
            if len(out) >= n:
                break
            mine = k % 3 == 1 and rnd.random() < 0.5  # about a tenth: the user's replies
            name, addr = folks[rnd.randrange(len(folks))]
            msgid = f"c{conv}.{k}@{'example.com' if mine else 'remote.test'}"
            prefix = "" if k == 0 else rnd.choice(["Re: ", "RE: ", "AW: ", "Re[2]: "])
            linked = k > 0 and rnd.random() < 0.85  # the rest thread by subject only
            head = (f"From: {USER if mine else f'{name} <{addr}>'}\r\n"
                    f"To: {f'{name} <{addr}>' if mine else USER}\r\nSubject: {prefix}{subject}\r\n"
                    f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{msgid}>\r\n")
            if linked:
                chain = " ".join(f"<{x}>" for x in refs[-10:])
                head += f"In-Reply-To: <{refs[-1]}>\r\nReferences: {chain}\r\n"
            body = f"Message {k} about {subject}.\r\n" + "A line of ordinary message text.\r\n" * 30
            out.append((fields.SENT if mine else fields.INBOX, "sent" if mine else "received",
                        (head + "\r\n" + body).encode()))
            refs.append(msgid)
    return out


async def fill(url: str, n: int) -> int:
    """Deliver the planned messages with the receiver's scripted write, 50 at a time."""
    r = async_client(url)
    messages = plan(n)
    try:
        for start in range(0, len(messages), 50):
            calls = []
            for folder, kind, raw in messages[start : start + 50]:
                flags = (fields.SEEN,) if kind == "sent" else ()
                d = delivery.Delivery(USER, "default", folder, flags, kind)
                calls.append(delivery.deliver_async(r, [d], new_id(), raw))
            await asyncio.gather(*calls)
    finally:
        await r.aclose()
    return len(messages)


def spread(r: redis.Redis, n: int) -> None:
    """Date the messages as if they had come over five days (40 s apart), keeping their order:
    delivered in seconds, they would all fall in the index's look-back window."""
    now = int(time.time() * 1000)
    with r.pipeline(transaction=False) as pipe:
        for folder in (fields.INBOX, fields.SENT):
            pipe.zrange(keys.folder(USER, folder), 0, -1, withscores=True)
        found = pipe.execute()
    order = sorted((int(ts), folder, i.decode()) for folder, rows in zip((fields.INBOX, fields.SENT), found,
                                                                         strict=True) for i, ts in rows)
    with r.pipeline(transaction=False) as pipe:
        for k, (_, folder, msg_id) in enumerate(order):
            ts = now - (n - k) * 40_000
            pipe.hset(keys.message(USER, msg_id), fields.TS, ts)
            pipe.zadd(keys.folder(USER, folder), {msg_id: ts})
        pipe.execute()


def provision(r: redis.Redis, users: int) -> None:
    d = directory.Directory(r, directory.ensure_buckets(r, 65536))
    d.put(directory.Mailbox(USER, "default", "{PLAIN}x"))
    rnd = random.Random(3)
    for domain, count in (("example.com", users), ("other.example", users // 5)):
        for start in range(0, count, 5000):
            batch = []
            for i in range(start, min(start + 5000, count)):
                local = "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(3, 8)))
                batch.append((directory.Mailbox(f"{local}.{i}@{domain}", "default", "{PLAIN}x"), None))
            d.put_many(batch)


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


def timed(client: Any, paths: list[str]) -> list[float]:
    out = []
    for path in paths:  # bounded: one request per path
        t0 = time.perf_counter()
        resp = client.get(path)
        out.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise SystemExit(f"{path}: {resp.status_code}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--directory", type=int, default=100_000, help="users of the user's own domain")
    ap.add_argument("--requests", type=int, default=1000, help="requests per measured page")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            run(server.url, args)
        finally:
            server.stop()


def run(url: str, args: argparse.Namespace) -> None:
    r = redis.Redis.from_url(url)
    t0 = time.perf_counter()
    provision(r, args.directory)
    names = [k for k in r.scan_iter("dirx:*", count=1000)]
    index_bytes = sum(int(r.memory_usage(k) or 0) for k in names)
    print(f"directory: {args.directory + args.directory // 5:,} users provisioned in "
          f"{time.perf_counter() - t0:.1f} s; name index {len(names):,} keys, "
          f"{index_bytes / (args.directory * 1.2):.0f} bytes per user")
    t0 = time.perf_counter()
    n = asyncio.run(fill(url, args.messages))
    print(f"mailbox: {n:,} messages delivered (receiver's script) in {time.perf_counter() - t0:.1f} s")
    spread(r, n)

    settings = replace(load_settings({"redis_url": url, "hostname": "bench.test"}, env={}),
                       secret_key=SECRET)
    app = create_app(settings, r)
    t0 = time.perf_counter()
    calls, indexed = 0, 0
    print(f"load average before the timed part: {os.getloadavg()[0]:.1f}")
    for _ in range(100):  # bounded: each call indexes up to 20,000
        calls += 1
        done = threads.catch_up(r, USER)
        indexed += done
        if not done:
            break
    backfill = time.perf_counter() - t0
    conv_count = len({v for v in r.hvals(keys.thread_of(USER))})
    print(f"catch-up of the whole mailbox: {indexed:,} messages in {backfill * 1000:.0f} ms "
          f"({calls} calls), {conv_count:,} conversations")
    idle = []
    for _ in range(args.requests):
        t1 = time.perf_counter()
        threads.catch_up(r, USER)
        idle.append((time.perf_counter() - t1) * 1000)

    with app.app_context():
        session = app.extensions["fallback"].sessions.create(USER)
    client = app.test_client()
    client.set_cookie(COOKIE, session.token)
    rnd = random.Random(5)
    ids = [i.decode() for i in r.zrange(keys.folder(USER, fields.INBOX), 0, -1)]
    sample = [rnd.choice(ids) for _ in range(args.requests)]
    sizes = [threads.conversation(r, USER, i)[1] for i in sample]
    typed = []
    folks = people(400)
    for _ in range(args.requests // 4):
        word = rnd.choice([rnd.choice(folks)[0].split()[rnd.randrange(2)].lower(),
                           "".join(rnd.choice(string.ascii_lowercase) for _ in range(4))])
        typed += [word[:k] for k in range(1, 5)]  # a user typing four letters
    timed(client, ["/healthz"] * 50 + [f"/message/{i}" for i in sample[:50]])  # warm up
    health = timed(client, ["/healthz"] * args.requests)
    message = timed(client, [f"/message/{i}" for i in sample])
    contacts = timed(client, [f"/contacts?q={q}" for q in typed])
    part = []
    with app.test_request_context("/"):
        from flask import g

        g.user = USER
        for i in sample:
            t1 = time.perf_counter()
            conversations.for_message(i)
            part.append((time.perf_counter() - t1) * 1000)
    base = stats(health)
    print(f"\n{len(sample)} message pages (conversations of {min(sizes)} to {max(sizes)} messages, "
          f"median {statistics.median(sizes):.0f}), {len(typed)} suggestion queries, "
          f"{len(health)} /healthz; Flask test client, in-process\n")
    print("| request | median ms | p95 ms | p95 / healthz |")
    print("|---|---:|---:|---:|")
    for label, samples in (("/healthz (baseline)", health),
                           ("/message/<id> (with its conversation)", message),
                           ("conversation part alone (for_message)", part),
                           ("catch-up with nothing new", idle), ("/contacts?q= (1-4 letters)", contacts)):
        med, p95 = stats(samples)
        print(f"| {label} | {med:.2f} | {p95:.2f} | {p95 / base[1]:.1f}x |")


if __name__ == "__main__":
    main()
