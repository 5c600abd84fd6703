"""Redis memory per stored message against its size, and what zstd would save.

Part 1 (memory): messages of about 1 KiB, 4 KiB, 16 KiB, 100 KiB and 1 MiB
(each size jittered by +-10 %, so that no run sits on one allocator size
class) go through the real store path, `fallback.mailbox.delivery.deliver`, into a fresh
redis-server configured like the embedded one (AOF, appendfsync always,
noeviction, the listpack settings).  Each size gets its own mailboxes, a fixed
number of messages per mailbox (default 50).  Printed per size: used_memory
after minus before divided by the number of messages (everything one stored
message costs: its hash with `raw` and metadata, its entries in the folder
zset and the unseen/pending sets, its share of the mailbox's info hash and of
the status counters), `MEMORY USAGE` of one message hash, and the overhead
over the raw size in bytes and as a ratio.

Part 2 (compression, nothing stored): a mix of realistic messages made with
Python's email package -- plain-text mails, HTML newsletters (text and HTML
alternatives), mails with a base64 PDF or DOCX attachment, mails with a base64
JPEG -- compressed with zstd at levels 1 and 3.  Text comes from the docstrings
of Python's standard library (real English prose); base64 of random bytes
stands in for already-compressed content (a JPEG; the deflated streams of a
PDF; a DOCX, which is a zip).  Printed per kind and for the whole mix: the
compression ratio (raw / compressed) and CPU microseconds per message to
compress and to decompress, on this process's CPU time.  Every round trip is
checked to give back the exact bytes.

    .venv/bin/python bench/message_memory.py            # both parts
    .venv/bin/python bench/message_memory.py --quick    # fewer messages
    .venv/bin/python bench/message_memory.py --no-redis # compression only

zstd comes from the `zstandard` package: `make bench-deps` (or
`.venv/bin/pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import email.policy
import email.utils
import functools
import inspect
import pydoc
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fallback.mailbox import (  # noqa: E402
    delivery,
    headers,
)
from tests.servers import RedisServer  # noqa: E402

SIZES = {"1KiB": 1024, "4KiB": 4096, "16KiB": 16 * 1024, "100KiB": 100 * 1024, "1MiB": 1024 * 1024}
COUNTS = {"1KiB": 4000, "4KiB": 4000, "16KiB": 2000, "100KiB": 500, "1MiB": 60}


# --- realistic text, from the standard library's own docs -------------------------------

def prose_corpus() -> list[str]:
    """Paragraphs of English prose: the docstrings of the standard library's modules."""
    import collections
    import concurrent.futures
    import csv
    import datetime
    import decimal
    import email as email_pkg
    import http.client
    import json
    import logging
    import os
    import pathlib
    import re
    import socket
    import sqlite3
    import ssl
    import subprocess
    import threading
    import urllib.request
    import zipfile

    paragraphs: list[str] = []
    for module in (collections, concurrent.futures, csv, datetime, decimal, email_pkg, http.client, json,
                   logging, os, pathlib, re, socket, sqlite3, ssl, subprocess, threading, urllib.request,
                   zipfile, argparse, inspect, pydoc, random, statistics, tempfile):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                paragraphs += [p.replace("\n", " ") for p in doc.split("\n\n") if len(p) > 80]
    return sorted(set(paragraphs))


class Maker:
    """Builds messages of a given kind and approximate size with the email package."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.prose = prose_corpus()

    def text(self, size: int) -> str:
        out: list[str] = []
        total = 0
        while total < size:
            para = self.rng.choice(self.prose)
            out.append(para)
            total += len(para) + 2
        return "\n\n".join(out)[:size]

    def _base(self, subject: str) -> EmailMessage:
        msg = EmailMessage(policy=email.policy.SMTP)
        n = self.rng.randrange(10_000)
        msg["From"] = f"Sender {n} <sender{n}@remote{n % 97}.example.net>"
        msg["To"] = "Alice Example <alice@example.com>"
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(1_750_000_000 + n * 37)
        msg["Message-ID"] = email.utils.make_msgid(domain=f"remote{n % 97}.example.net")
        return msg

    def plain(self, size: int) -> bytes:
        msg = self._base("Re: the plan for " + self.text(40))
        msg.set_content(self.text(max(size - 450, 10)))
        return msg.as_bytes()

    def newsletter(self, size: int) -> bytes:
        msg = self._base("Newsletter: " + self.text(50))
        rows: list[str] = []
        text_parts: list[str] = []
        total = 0
        while total < size * 0.75:
            title, body = self.text(60), self.text(self.rng.randrange(200, 700))
            n = self.rng.randrange(100_000)
            rows.append(
                '<tr><td style="padding:16px 24px;font-family:Helvetica,Arial,sans-serif;'
                'font-size:15px;line-height:22px;color:#333333;">'
                f'<h2 style="margin:0 0 8px 0;font-size:20px;color:#111111;">{title}</h2>'
                f'<p style="margin:0 0 12px 0;">{body}</p>'
                f'<a href="https://news.example.net/click?u=alice&amp;id={n}&amp;utm_source=newsletter'
                f'&amp;utm_medium=email" style="color:#1a73e8;text-decoration:none;">Read more</a>'
                "</td></tr>")
            text_parts.append(f"{title}\n\n{body}\n\nRead more: https://news.example.net/click?id={n}\n")
            total += len(rows[-1]) + len(text_parts[-1])
        html = ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>Newsletter</title></head>'
                '<body style="margin:0;padding:0;background:#f4f4f4;"><table role="presentation" '
                'width="100%" cellpadding="0" cellspacing="0" border="0"><tr><td align="center">'
                '<table role="presentation" width="600" cellpadding="0" cellspacing="0" border="0" '
                'style="background:#ffffff;">' + "\n".join(rows) + "</table></td></tr></table></body></html>")
        msg.set_content("\n".join(text_parts))
        msg.add_alternative(html, subtype="html")
        return msg.as_bytes()

    def _attachment(self, subject: str, data: bytes, maintype: str, subtype: str, name: str) -> bytes:
        msg = self._base(subject)
        msg.set_content(self.text(self.rng.randrange(300, 1500)))
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
        return msg.as_bytes()

    def pdf(self, size: int) -> bytes:
        """A PDF-like body: deflated streams (random bytes) between readable object syntax."""
        raw_size = size * 3 // 4
        parts: list[bytes] = [b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"]
        obj = 1
        while sum(map(len, parts)) < raw_size:
            stream = self.rng.randbytes(self.rng.randrange(2_000, 30_000))
            parts.append(f"{obj} 0 obj\n<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode()
                         + stream + b"\nendstream\nendobj\n")
            parts.append(f"{obj + 1} 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
                         f"/Contents {obj} 0 R /Resources << /Font << /F1 5 0 R >> >> >>\nendobj\n".encode())
            obj += 2
        parts.append(b"xref\n0 %d\n" % obj + b"".join(b"%010d 00000 n \n" % (i * 997) for i in range(obj))
                     + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n123456\n%%%%EOF\n" % obj)
        data = b"".join(parts)
        if self.rng.random() < 0.5:
            return self._attachment("Invoice " + self.text(20), data, "application", "pdf", "invoice.pdf")
        # A DOCX is a zip: as incompressible as random bytes.
        return self._attachment("Report " + self.text(20), self.rng.randbytes(raw_size), "application",
                                "vnd.openxmlformats-officedocument.wordprocessingml.document", "report.docx")

    def jpeg(self, size: int) -> bytes:
        data = b"\xff\xd8\xff\xe0" + self.rng.randbytes(size * 3 // 4)
        return self._attachment("Photos " + self.text(20), data, "image", "jpeg", "IMG_1234.jpg")

    def sized(self, size: int) -> bytes:
        """A plain-text message of exactly `size` bytes (CRLF lines), for the memory table."""
        raw = self.plain(size + 200).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        body = body[: max(size - len(head) - 4, 0)]
        return head + b"\r\n\r\n" + body


# --- part 1: memory per stored message -----------------------------------------------------

def used_memory(r: object) -> int:
    """used_memory less the clients' buffers and the AOF buffer: those hold the last
    command in flight (up to a whole 1 MiB message), not what is stored."""
    info = r.info("memory")  # type: ignore[attr-defined]
    buffers = int(info.get("mem_clients_normal", 0)) + int(info.get("mem_aof_buffer", 0))
    return int(info["used_memory"]) - buffers

def mailbox_of(size_name: str, i: int, per_mailbox: int) -> str:
    return f"mem{size_name.lower()}-{i // per_mailbox}@example.com"


def message_key(size_name: str, i: int, per_mailbox: int) -> str:
    return f"mbx:{{{mailbox_of(size_name, i, per_mailbox)}}}:m:{size_name}-{i:06d}"


def split_layout_usage(r: Any, key: str) -> int:
    """MEMORY USAGE of the same message stored the other way: `raw` in a string key of its
    own and the metadata in a small hash, which then stays listpack-encoded.  Not what the
    service does; written under scratch keys (same slot) and deleted again."""
    fields = r.hgetall(key)
    raw = fields.pop(b"raw")
    meta_key, raw_key = key + ":alt-meta", key + ":alt-raw"
    r.hset(meta_key, mapping=fields)
    r.set(raw_key, raw)
    usage = int(r.memory_usage(meta_key, samples=0) or 0) + int(r.memory_usage(raw_key, samples=0) or 0)
    r.delete(meta_key, raw_key)
    return usage


def memory_table(counts: dict[str, int], per_mailbox: int) -> None:
    import redis

    maker = Maker()
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-msgmem-"))
    server = RedisServer(work / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        print(f"redis-server {r.info('server')['redis_version']} (appendonly yes, appendfsync always); "
              f"{per_mailbox} messages per mailbox; sizes jittered +-10 %")
        print(f"{'size':>7} {'msgs':>5} {'mean raw B':>11} {'Redis B/msg':>12} {'overhead B':>11} "
              f"{'Redis/raw':>10} {'MEMORY USAGE hash':>18} {'hash/raw':>9} {'split layout':>13}")
        for name, nominal in SIZES.items():
            count = counts[name]
            # One body per size, trimmed per message: building each with the email package
            # would dominate the run and the content does not change the memory.
            template = maker.sized(int(nominal * 1.1) + 64)
            raws = [template[: int(nominal * maker.rng.uniform(0.9, 1.1))] for _ in range(count)]
            meta = headers.summarize(template)
            before = used_memory(r)
            for i, raw in enumerate(raws):
                address, msg_id = mailbox_of(name, i, per_mailbox), f"{name}-{i:06d}"
                delivery.deliver(r, [delivery.Delivery(address, "store0")], msg_id, raw, meta)
            after = used_memory(r)
            mean_raw = statistics.fmean(len(x) for x in raws)
            per = (after - before) / count
            sampled = range(0, count, max(count // 20, 1))
            usage = statistics.fmean(int(r.memory_usage(message_key(name, i, per_mailbox), samples=0) or 0)
                                     for i in sampled)
            split = statistics.fmean(split_layout_usage(r, message_key(name, i, per_mailbox))
                                     for i in sampled)
            print(f"{name:>7} {count:>5} {mean_raw:>11,.0f} {per:>12,.0f} {per - mean_raw:>11,.0f} "
                  f"{per / mean_raw:>10.3f} {usage:>18,.0f} {usage / mean_raw:>9.3f} {split:>13,.0f}",
                  flush=True)
        info = r.info("memory")
        print(f"used_memory {int(info['used_memory']):,} B, "
              f"used_memory_rss {int(info['used_memory_rss']):,} B, "
              f"mem_fragmentation_ratio {info['mem_fragmentation_ratio']}")
        r.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


# --- part 2: zstd on a realistic mix -------------------------------------------------------

# kind: (builder name, share of messages in the mix, size range in bytes)
MIX = {
    "plain text": ("plain", 0.50, (1_500, 12_000)),
    "HTML newsletter": ("newsletter", 0.25, (15_000, 90_000)),
    "PDF/DOCX attachment": ("pdf", 0.15, (80_000, 1_500_000)),
    "JPEG attachment": ("jpeg", 0.10, (150_000, 3_000_000)),
}


def cpu_us(fn: Callable[[], object], repeat: int) -> float:
    """Mean CPU microseconds (this process) of one call."""
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - t0) / repeat * 1e6


def compression_table(total: int) -> None:
    import zstandard

    maker = Maker(seed=11)
    rng = random.Random(3)
    mix: dict[str, list[bytes]] = {}
    for kind, (builder, share, (lo, hi)) in MIX.items():
        n = max(int(total * share), 4)
        make = getattr(maker, builder)
        mix[kind] = [make(int(rng.uniform(lo, hi)))
                     for _ in range(n)]
    levels = (1, 3)
    print(f"zstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION}); "
          f"{sum(map(len, mix.values()))} messages; CPU us per message (process time, one core); "
          "ratio = raw bytes / compressed bytes")
    header = f"{'kind':>20} {'msgs':>5} {'mean KiB':>9}"
    for level in levels:
        header += f" {f'L{level} ratio':>9} {f'L{level} comp us':>11} {f'L{level} MB/s':>8}"
    header += f" {f'L{levels[-1]} decomp us':>13}"
    print(header)
    totals = {level: [0.0, 0.0, 0.0, 0.0] for level in levels}  # raw, compressed, comp us, decomp us
    count_all = 0
    for kind, raws in mix.items():
        line = f"{kind:>20} {len(raws):>5} {statistics.fmean(map(len, raws)) / 1024:>9.1f}"
        decomp = 0.0
        for level in levels:
            cctx = zstandard.ZstdCompressor(level=level)
            dctx = zstandard.ZstdDecompressor()
            raw_bytes = comp_bytes = 0
            comp_us = decomp_us = 0.0
            for raw in raws:
                packed = cctx.compress(raw)
                if dctx.decompress(packed) != raw:
                    raise AssertionError("zstd round trip changed the bytes")
                repeat = 20 if len(raw) < 100_000 else 3
                comp_us += cpu_us(functools.partial(cctx.compress, raw), repeat)
                decomp_us += cpu_us(functools.partial(dctx.decompress, packed), repeat)
                raw_bytes += len(raw)
                comp_bytes += len(packed)
            t = totals[level]
            t[0] += raw_bytes
            t[1] += comp_bytes
            t[2] += comp_us
            t[3] += decomp_us
            mbps = raw_bytes / comp_us if comp_us else 0.0  # bytes per us = MB/s
            line += f" {raw_bytes / comp_bytes:>9.2f} {comp_us / len(raws):>11,.0f} {mbps:>8.0f}"
            decomp = decomp_us / len(raws)
        line += f" {decomp:>13,.0f}"
        count_all += len(raws)
        print(line, flush=True)
    line = f"{'whole mix':>20} {count_all:>5} {totals[1][0] / count_all / 1024:>9.1f}"
    for level in levels:
        total_raw, total_comp, total_us, _ = totals[level]
        line += f" {total_raw / total_comp:>9.2f} {total_us / count_all:>11,.0f} {total_raw / total_us:>8.0f}"
    line += f" {totals[levels[-1]][3] / count_all:>13,.0f}"
    print(line)
    print("(whole mix: ratio of summed bytes, i.e. weighted by size; CPU is the mean per message)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a quarter of the messages")
    ap.add_argument("--per-mailbox", type=int, default=50, help="messages per mailbox (default 50)")
    ap.add_argument("--mix", type=int, default=400, help="messages in the compression mix (default 400)")
    ap.add_argument("--no-redis", action="store_true", help="only the compression part")
    ap.add_argument("--no-zstd", action="store_true", help="only the memory part")
    args = ap.parse_args()
    scale = 4 if args.quick else 1
    if not args.no_redis:
        memory_table({k: max(v // scale, 10) for k, v in COUNTS.items()}, args.per_mailbox)
        print()
    if not args.no_zstd:
        try:
            import zstandard  # noqa: F401
        except ImportError:
            print("zstandard is not installed: `make bench-deps` (or .venv/bin/pip install -e '.[bench]')")
            return 1
        compression_table(args.mix // scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
