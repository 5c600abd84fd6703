"""Redis memory per stored message against its size, zstd on a realistic mix, and intake.

Part 1 (memory by size): messages of about 1 KiB, 4 KiB, 16 KiB, 100 KiB and
1 MiB of plain text (each size jittered by +-10 %, so that no run sits on one
allocator size class) stored into a fresh redis-server configured like the
embedded one (AOF, appendfsync always, noeviction, the listpack settings), 50
per mailbox, three times: as the code before issue 17 stored them (record layout 1,
written by `layout1`), as its first step did (layout 2, the bytes inside the hash,
`layout2`) and through the real store path, `fallback.mailbox.delivery.deliver`
(layout 3, the bytes in a key of their own; zstd unless `--store-compression off`).
Printed per size and layout: used_memory after minus before per message, the
stored value's mean length, the fixed bytes (Redis bytes less the stored value),
`MEMORY USAGE` of the record (the hash and, layout 3, the bytes' key), and
"MU fixed": MEMORY USAGE of the hash less its `raw` plus the message's share of
the folder zset, the unseen and pending sets and the info hash.

Part 2 (the realistic mix, stored): the mix below (and its text-only part)
stored in every layout: Redis bytes per message against raw bytes.

Part 3 (compression levels, nothing stored): a mix of realistic messages made
with Python's email package -- plain-text mails, HTML newsletters (text and
HTML alternatives), mails with a base64 PDF or DOCX attachment, mails with a
base64 JPEG -- compressed with zstd at levels 1, 3 and 6.  Text comes from the
docstrings of Python's standard library (real English prose); base64 of random
bytes stands in for already-compressed content (a JPEG; the deflated streams
of a PDF; a DOCX, which is a zip).  Printed per kind and for the whole mix: the
compression ratio (raw / compressed) and CPU microseconds per message to
compress and to decompress, on this process's CPU time.  Every round trip is
checked to give back the exact bytes.

Part 4 (`--intake-rounds N`, instead of the others): the durable receiver with
`--store-compression zstd` against `off` under smtp-source, rounds interleaved.

Part 5 (`--script-rounds N`, instead of the others): redis-server's own CPU (INFO
cpu) per call of the receiver's delivery script as layout 2 wrote (the bytes in
the hash) and as layout 3 writes (one more key per message), rounds interleaved.

    .venv/bin/python bench/message_memory.py            # parts 1-3
    .venv/bin/python bench/message_memory.py --quick    # fewer messages
    .venv/bin/python bench/message_memory.py --no-redis # part 3 only
    .venv/bin/python bench/message_memory.py --intake-rounds 16 --conns 10
    .venv/bin/python bench/message_memory.py --script-rounds 6 --messages 5000
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

from fallback import keys  # noqa: E402
from fallback.mailbox import (  # noqa: E402
    compression,
    delivery,
    headers,
    record,
)
from fallback.mailbox import fields as F  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

SIZES = {"1KiB": 1024, "4KiB": 4096, "16KiB": 16 * 1024, "100KiB": 100 * 1024, "1MiB": 1024 * 1024}
LAYOUTS = (1, 2, 3)  # record.py: 1 before issue 17, 2 its first step, 3 the bytes in a key of their own
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


def layout1(r: Any, d: delivery.Delivery, msg_id: str, raw: bytes, meta: dict[str, str]) -> None:
    """Store one message as the code before issue 17 did (record layout 1: raw as received, one
    field per display value, v and rstate written), for the before/after rows of one run."""
    now_ms = int(time.time() * 1000)
    with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.message(d.address, msg_id), mapping={
            F.VERSION: "1", F.RAW: raw, F.FOLDER: d.folder, F.FLAGS: "", F.TS: now_ms, F.SIZE: len(raw),
            F.KIND: d.kind, F.RSTATE: F.PENDING, **meta})
        delivery._queue_indexes(pipe, d, msg_id, len(raw), now_ms)
        pipe.execute()


def layout2(r: Any, d: delivery.Delivery, msg_id: str, raw: bytes, meta: dict[str, str],
            how: compression.Codec) -> None:
    """Store one message as issue 17's first step did (record layout 2: the bytes, maybe zstd,
    inside the hash beside the packed display values), for the rows of one run."""
    now_ms = int(time.time() * 1000)
    packed = "\0".join(["2", *(meta.get(name, "").replace("\0", "") for name in F.PARSED)])
    with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.message(d.address, msg_id), mapping={
            F.RAW: how.pack(raw), F.SIZE: len(raw), F.PACKED: packed, F.FOLDER: d.folder, F.TS: now_ms})
        delivery._queue_indexes(pipe, d, msg_id, len(raw), now_ms)
        pipe.execute()


# The stored value's length, any layout: the hash's `raw` field, or the bytes' own key (a string,
# or a hash of pieces, record.PIECE).  KEYS: the record, its bytes' key.
_STORED_LEN = """
local t = redis.call('TYPE', KEYS[2])['ok']
if t == 'string' then return redis.call('STRLEN', KEYS[2]) end
if t ~= 'hash' then return redis.call('HSTRLEN', KEYS[1], 'raw') end
local n = 0
for i = 1, redis.call('HLEN', KEYS[2]) do n = n + redis.call('HSTRLEN', KEYS[2], tostring(i)) end
return n
"""


def queue_stored_len(pipe: Any, key: str) -> None:
    """Two replies whose sum is the stored value's length (the second is always 0)."""
    pipe.execute_command("EVAL", _STORED_LEN, 2, key, record.raw_key(key))
    pipe.echo("0")


def fixed_usage(r: Any, name: str, count: int, per_mailbox: int) -> float:
    """MEMORY USAGE per message less its stored value: the message hash (and, layout 3, the
    bytes' own key) less the value itself, plus its share of the mailbox's index structures
    (folder zset, unseen and pending sets, info hash)."""
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        key = message_key(name, i, per_mailbox)
        pipe.memory_usage(key, samples=0)
        pipe.memory_usage(record.raw_key(key), samples=0)
        queue_stored_len(pipe, key)
    mailboxes = sorted({mailbox_of(name, i, per_mailbox) for i in range(count)})
    for address in mailboxes:
        for key in (keys.folder(address, F.INBOX), keys.unseen(address), keys.pending(address),
                    keys.info(address)):
            pipe.memory_usage(key, samples=0)
    got = [int(x or 0) for x in pipe.execute()]
    records = sum(got[0 : 4 * count : 4]) + sum(got[1 : 4 * count : 4])
    values = sum(got[2 : 4 * count : 4]) + sum(got[3 : 4 * count : 4])
    return (records - values + sum(got[4 * count :])) / count


def mean_stored(r: Any, name: str, count: int, per_mailbox: int) -> float:
    pipe = r.pipeline(transaction=False)
    for i in range(count):
        queue_stored_len(pipe, message_key(name, i, per_mailbox))
    return sum(int(x or 0) for x in pipe.execute()) / count


def record_usage(r: Any, key: str) -> int:
    """MEMORY USAGE of a message: its hash and, layout 3, its bytes' own key."""
    return sum(int(r.memory_usage(k, samples=0) or 0) for k in (key, record.raw_key(key)))


def store_all(r: Any, name: str, raws: list[bytes], metas: list[dict[str, str]], per_mailbox: int,
              layout: int, how: compression.Codec) -> tuple[float, float, float, float]:
    """(Redis bytes per message, mean raw bytes, mean stored `raw` bytes, fixed bytes per
    message by MEMORY USAGE) of storing `raws`."""
    before = used_memory(r)
    for i, (raw, meta) in enumerate(zip(raws, metas, strict=True)):
        d = delivery.Delivery(mailbox_of(name, i, per_mailbox), "store0")
        if layout == 1:
            layout1(r, d, f"{name}-{i:06d}", raw, meta)
        elif layout == 2:
            layout2(r, d, f"{name}-{i:06d}", raw, meta, how)
        else:
            delivery.deliver(r, [d], f"{name}-{i:06d}", raw, meta, how=how)
    per = (used_memory(r) - before) / len(raws)
    stored = mean_stored(r, name, len(raws), per_mailbox)
    return per, statistics.fmean(map(len, raws)), stored, fixed_usage(r, name, len(raws), per_mailbox)


def mix_table(total: int, per_mailbox: int, how: compression.Codec) -> None:
    """Redis bytes against raw bytes of the realistic mix and of its text-only part, stored
    every way in one fresh server: layout 1 as received (before issue 17), layouts 2 and 3."""
    import redis

    maker = Maker(seed=11)
    rng = random.Random(3)
    mix: list[tuple[str, bytes]] = []
    for kind, (builder, share, (lo, hi)) in MIX.items():
        make = getattr(maker, builder)
        mix += [(kind, make(int(rng.uniform(lo, hi)))) for _ in range(max(int(total * share), 4))]
    text = [raw for kind, raw in mix if kind in ("plain text", "HTML newsletter")]
    every = [raw for _, raw in mix]
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-msgmix-"))
    server = RedisServer(work / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        print(f"{'messages':>24} {'layout':>7} {'msgs':>5} {'mean raw B':>11} {'stored raw B':>13} "
              f"{'Redis B/msg':>12} {'fixed B/msg':>12} {'raw/Redis':>10} {'MU fixed':>9}")
        for label, raws in (("realistic mix", every), ("text only (plain+HTML)", text)):
            metas = [headers.summarize(raw) for raw in raws]
            for layout in LAYOUTS:
                name = f"{label[:4]}{layout}"
                per, mean_raw, stored, fixed = store_all(r, name, raws, metas, per_mailbox, layout, how)
                print(f"{label:>24} {layout:>7} {len(raws):>5} {mean_raw:>11,.0f} {stored:>13,.0f} "
                      f"{per:>12,.0f} {per - stored:>12,.0f} {mean_raw / per:>10.2f} {fixed:>9,.0f}",
                      flush=True)
        r.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("(fixed B/msg: used_memory per message less the stored `raw` value: the record's other "
          "fields, its key, its index entries, allocator rounding; MU fixed: the same by MEMORY USAGE "
          "of the hash less `raw`, plus its share of the folder zset, unseen/pending sets, info)")


def memory_table(counts: dict[str, int], per_mailbox: int, how: compression.Codec) -> None:
    import redis

    maker = Maker()
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-msgmem-"))
    server = RedisServer(work / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        print(f"redis-server {r.info('server')['redis_version']} (appendonly yes, appendfsync always); "
              f"{per_mailbox} messages per mailbox; sizes jittered +-10 %")
        print(f"{'size':>7} {'layout':>6} {'msgs':>5} {'mean raw B':>11} {'stored B':>9} "
              f"{'Redis B/msg':>12} {'fixed B':>8} {'Redis/raw':>10} {'MEMORY USAGE hash':>18} "
              f"{'MU fixed':>9}")
        for name, nominal in SIZES.items():
            count = counts[name]
            # One body per size, trimmed per message: building each with the email package
            # would dominate the run and the content does not change the memory.
            template = maker.sized(int(nominal * 1.1) + 64)
            raws = [template[: int(nominal * maker.rng.uniform(0.9, 1.1))] for _ in range(count)]
            meta = headers.summarize(template)
            for layout in LAYOUTS:
                per, mean_raw, stored, fixed = store_all(r, f"{name}L{layout}", raws, [meta] * count,
                                                         per_mailbox, layout, how)
                sampled = range(0, count, max(count // 20, 1))
                usage = statistics.fmean(record_usage(r, message_key(f"{name}L{layout}", i, per_mailbox))
                                         for i in sampled)
                print(f"{name:>7} {layout:>6} {count:>5} {mean_raw:>11,.0f} {stored:>9,.0f} {per:>12,.0f} "
                      f"{per - stored:>8,.0f} {per / mean_raw:>10.3f} {usage:>18,.0f} {fixed:>9,.0f}",
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
    levels = (1, 3, 6)
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


def intake_ab(rounds: int, messages: int, sessions: int) -> None:
    """Part 4: the durable receiver with `--store-compression zstd` against `off`, each its own
    process on one redis-server, under Postfix's smtp-source (4 KiB, kept connections), rounds
    interleaved (zstd first in odd rounds): the median of the paired zstd/off ratios."""
    from bench import smtp_ingest

    work = Path(tempfile.mkdtemp(prefix="fallback-bench-zstd-ab-"))
    server = RedisServer(work / "redis").start()
    smtp_ingest.provision(server.url)
    kinds = (compression.ZSTD, compression.OFF)
    ports = {kind: smtp_ingest.free_port() for kind in kinds}
    procs = {kind: smtp_ingest.start_server(kind, port, server.url, work) for kind, port in ports.items()}
    cpu = dict.fromkeys(kinds, 0.0)
    ratios: list[float] = []
    try:
        for kind in kinds:
            smtp_ingest.drive(ports[kind], 4096, sessions, 200)  # warm up
            cpu[kind] -= smtp_ingest.cpu_seconds(procs[kind].pid)
        for n in range(rounds):
            order = kinds if n % 2 == 0 else kinds[::-1]
            rates = {kind: smtp_ingest.drive(ports[kind], 4096, sessions, messages) for kind in order}
            ratios.append(rates[compression.ZSTD] / rates[compression.OFF])
            print(f"round {n + 1:>2}: zstd {rates['zstd']:>6.0f}/s  off {rates['off']:>6.0f}/s  "
                  f"zstd/off {ratios[-1]:.3f}", flush=True)
        for kind in kinds:
            cpu[kind] += smtp_ingest.cpu_seconds(procs[kind].pid)
    finally:
        for proc in procs.values():
            smtp_ingest.stop_pid(proc)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"zstd/off: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f} "
          f"({rounds} rounds of {messages} x 4 KiB at {sessions} connections)")
    per = {kind: cpu[kind] / (rounds * messages) * 1e6 for kind in kinds}
    print(f"receiver CPU per message: zstd {per['zstd']:.0f} us, off {per['off']:.0f} us")


# --- part 5: Redis CPU of the delivery script, layout 2 against layout 3 --------------------

def layout2_script() -> str:
    """The delivery script as issue 17's first step had it: the bytes into the hash (`raw`)."""
    from fallback.mailbox import deliverscript

    now = ("redis.call('HSET', KEYS[k + 1], 'folder', ARGV[a + 1], unpack(common))\n"
           "  set_raw(KEYS[k + 6], raw)")
    if now not in deliverscript.DELIVER_LUA:
        raise SystemExit("the delivery script changed: update layout2_script")
    return deliverscript.DELIVER_LUA.replace(
        now, "redis.call('HSET', KEYS[k + 1], 'raw', raw, 'folder', ARGV[a + 1], unpack(common))")


def redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def script_ab(rounds: int, messages: int, size: int) -> None:
    """Redis CPU per scripted delivery (one recipient), layout 2's script against layout 3's,
    `rounds` interleaved rounds of `messages` calls each, the embedded settings (AOF always)."""
    import redis

    from fallback.mailbox import deliverscript

    maker = Maker(seed=5)
    raw = maker.sized(size)
    stored = record.store(raw, headers.summarize(raw))
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-script-"))
    server = RedisServer(work / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        scripts = {2: r.register_script(layout2_script()), 3: r.register_script(deliverscript.DELIVER_LUA)}
        per: dict[int, list[float]] = {2: [], 3: []}
        inside: dict[int, list[float]] = {2: [], 3: []}  # the script's own time (commandstats)
        for n in range(rounds):
            for layout in ((2, 3) if n % 2 == 0 else (3, 2)):
                r.config_resetstat()
                before = redis_cpu(r)
                for i in range(messages):
                    d = delivery.Delivery(f"cpu{layout}-{i % 200}@example.com", "store0")
                    keys_, args = deliverscript.deliver_call([d], f"R{n}-{i:06d}", stored,
                                                             1_700_000_000_000 + i)
                    scripts[layout](keys=keys_, args=args)
                per[layout].append((redis_cpu(r) - before) / messages * 1e6)
                inside[layout].append(float(r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]))
            print(f"round {n + 1}: redis-server CPU per delivery (fsync included), "
                  f"layout 2 {per[2][-1]:.1f} us, "
                  f"layout 3 {per[3][-1]:.1f} us, ratio 3/2 {per[3][-1] / per[2][-1]:.3f}; in the script "
                  f"{inside[2][-1]:.1f} / {inside[3][-1]:.1f} us, ratio {inside[3][-1] / inside[2][-1]:.3f}",
                  flush=True)
        for label, got in (("CPU per delivery", per), ("time in the script", inside)):
            ratios = [b / a for a, b in zip(got[2], got[3], strict=True)]
            print(f"{label}: median ratio layout 3 / layout 2 {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f}); medians {statistics.median(got[2]):.1f} "
                  f"and {statistics.median(got[3]):.1f} us")
        print(f"{len(stored.data):,} stored bytes per message")
        r.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a quarter of the messages")
    ap.add_argument("--per-mailbox", type=int, default=50, help="messages per mailbox (default 50)")
    ap.add_argument("--mix", type=int, default=400, help="messages in the compression mix (default 400)")
    ap.add_argument("--no-redis", action="store_true", help="only the compression part")
    ap.add_argument("--no-zstd", action="store_true", help="only the memory part")
    ap.add_argument("--store-compression", choices=compression.CHOICES, default=compression.ZSTD,
                    help="how layouts 2 and 3 store the bytes (the setting of the same name)")
    ap.add_argument("--intake-rounds", type=int, default=0, metavar="N",
                    help="instead: N interleaved rounds of the receiver with --store-compression "
                         "zstd and off (bench/smtp_ingest.py's durable receiver, smtp-source)")
    ap.add_argument("--messages", type=int, default=2000, help="messages per intake round")
    ap.add_argument("--conns", type=int, default=10, help="smtp-source connections per intake round")
    ap.add_argument("--script-rounds", type=int, default=0, metavar="N",
                    help="instead: N interleaved rounds of the delivery script of layout 2 and 3, "
                         "Redis CPU per call (--messages calls of --script-size bytes each)")
    ap.add_argument("--script-size", type=int, default=4096, help="message size for --script-rounds")
    args = ap.parse_args()
    if args.script_rounds:
        script_ab(args.script_rounds, args.messages, args.script_size)
        return 0
    if args.intake_rounds:
        intake_ab(args.intake_rounds, args.messages, args.conns)
        return 0
    scale = 4 if args.quick else 1
    how = compression.codec(args.store_compression)
    if not args.no_redis:
        memory_table({k: max(v // scale, 10) for k, v in COUNTS.items()}, args.per_mailbox, how)
        print()
        mix_table(args.mix // scale, args.per_mailbox, how)
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
