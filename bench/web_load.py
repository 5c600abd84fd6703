"""Webmail under load: requests/s and p50/p95 latency of the inbox and a message page.

A mailbox of 10,000 messages (default) in a fresh redis-server configured like
the embedded one (AOF, appendfsync always), the webmail served by gunicorn
exactly as `fallback up` starts it (fallback.webserver.WebComponent, default
workers and threads), and N concurrent keep-alive connections, at 1, 10 and
50, each request carrying one of N logged-in sessions' cookies.  The load
comes from `wrk` (Debian package; C, so it takes little CPU from the server on
a small machine) with a Lua script for the cookies and p95; without wrk, from
Python threads with http.client (`--python`), which cost more CPU.

The baseline, measured in the same run at the same concurrency, is
`GET /healthz`: the same gunicorn + Flask + Redis round trip with no page
behind it; the ratio says what the page itself costs.  The load generator
shares the machine's CPUs with gunicorn and Redis, so absolute figures are
pessimistic.  "CPU ms/req" is the CPU time the server side (gunicorn master
and workers, redis-server; from /proc) spent per request in that cell: it
hardly depends on what else runs on the machine, and says how many requests
per second a core can serve.

    .venv/bin/python bench/web_load.py                 # 10,000 messages; 1, 10, 50 sessions
    .venv/bin/python bench/web_load.py --messages 2000 --requests 200   # a quick run
    .venv/bin/python bench/web_load.py --sessions 10 --seconds 3 --rounds 5   # issue 17: medians of 5

With --rounds N every cell runs N times, the pages interleaved within each round (healthz,
inbox, message, search, then again), and the ratio to /healthz is the median of the rounds'
ratios with its spread: on a machine shared with other work, a ratio taken within one round
is what stays comparable.

The webmail keeps drawn pages for an identical next request (web/pagecache.py, keyed on all
they show; a list page on the mailbox's change token, fallback/mailbox/changes.py): "inbox"
and "message" are what a user reloading a page gets (the same rows, the same message: from
the cache after the first request), "inbox, drawn" and "message, drawn"
the same pages with a URL no request had before, so that every one is drawn in full.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fallback.config import load_settings  # noqa: E402
from fallback.ids import new_id  # noqa: E402
from fallback.mailbox import delivery, directory, headers, passwords  # noqa: E402
from fallback.webserver import WebComponent  # noqa: E402
from tests.servers import RedisServer, free_port  # noqa: E402
from web.sessions import COOKIE, SessionStore  # noqa: E402

USER = "load@example.com"
SECRET = "bench-secret-not-for-production-0123456789abcdef"
TARGET_INBOX_P95_MS = 50.0


def fill_mailbox(r: redis.Redis, n: int, batch: int = 500) -> list[str]:
    """n realistic small messages, delivered with the same write the receiver uses."""
    d = directory.Directory(r, directory.ensure_buckets(r, 65536))
    d.put(directory.Mailbox(USER, "default", passwords.hash_password("x", "SHA512-CRYPT")))
    ids: list[str] = []
    now = int(time.time() * 1000) - n * 1000
    for start in range(0, n, batch):
        with r.pipeline(transaction=True) as pipe:
            for i in range(start, min(start + batch, n)):
                msg_id = new_id(now + i * 1000)
                raw = (f"From: Sender {i % 97} <s{i % 97}@remote{i % 13}.test>\r\nTo: {USER}\r\n"
                       f"Subject: Report {i}: status of the outage and next steps\r\n"
                       f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m{i}@remote.test>\r\n\r\n"
                       + "A line of ordinary message text.\r\n" * 40).encode()
                delivery.queue_delivery(pipe, delivery.Delivery(USER, "default"), msg_id, raw,
                                     headers.summarize(raw), now + i * 1000)
                ids.append(msg_id)
            pipe.execute()
    return ids


def run_level(port: int, cookies: list[str], paths: list[str], total: int) -> dict[str, float]:
    """`total` GETs spread over len(cookies) sessions; returns rps and latency percentiles (ms)."""
    per = max(1, total // len(cookies))
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def session(cookie: str, seed: int) -> None:
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        for _ in range(per):  # bounded: exactly `per` requests
            path = rnd.choice(paths)
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"Cookie": f"{COOKIE}={cookie}"})
            resp = conn.getresponse()
            resp.read()
            mine.append((time.perf_counter() - t0) * 1000)
            if resp.status != 200:
                errors.append(f"{path}: {resp.status}")
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=session, args=(c, i)) for i, c in enumerate(cookies)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"bench: {len(errors)} failed requests, first: {errors[0]}")
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50_ms": q[49], "p95_ms": q[94]}


WRK_SCRIPT = """
local cookies = {%s}
local paths = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[math.random(#paths)], {["Cookie"] = "%s=" .. cookies[(n %% #cookies) + 1]})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def run_level_wrk(port: int, cookies: list[str], paths: list[str], seconds: float,
                  workdir: Path) -> dict[str, float]:
    """One cell with wrk: len(cookies) connections for `seconds` (bounded by wrk's -d)."""
    script = workdir / "web_load.lua"
    script.write_text(WRK_SCRIPT % (", ".join(f'"{c}"' for c in cookies),
                                    ", ".join(f'"{p}"' for p in paths), COOKIE))
    conns = len(cookies)
    proc = subprocess.run(
        ["wrk", "-t", str(min(2, conns)), "-c", str(conns), "-d", f"{max(1, round(seconds))}s",
         "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench: wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    out = proc.stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, duration_us, p50, p95, errors = (int(v) for v in line.split()[1:])
    if errors:
        raise SystemExit(f"bench: {errors} failed requests for {paths[0]}:\n{out}")
    return {"requests": requests, "rps": requests / (duration_us / 1e6), "p50_ms": p50 / 1000,
            "p95_ms": p95 / 1000}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def server_pids(master: int, redis_pid: int) -> list[int]:
    """gunicorn's master and workers, and redis-server: the CPU the server side spends."""
    pids = [master, redis_pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == master:
                pids.append(int(entry.name))
    return pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--sessions", default="1,10,50", help="concurrency levels (default 1,10,50)")
    ap.add_argument("--requests", type=int, default=1000,
                    help="requests per page and level (--python only)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per page and level (wrk)")
    ap.add_argument("--python", action="store_true", help="Python threads instead of wrk")
    ap.add_argument("--web-workers", type=int, help="override the default gunicorn workers")
    ap.add_argument("--web-threads", type=int, help="override the default threads per worker")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every cell this often, pages interleaved; medians reported (issue 17)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    levels = [int(x) for x in args.sessions.split(",")]
    use_wrk = not args.python and shutil.which("wrk") is not None

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        component = None
        try:
            r = redis.Redis.from_url(server.url)
            t0 = time.perf_counter()
            ids = fill_mailbox(r, args.messages)
            print(f"filled {USER} with {len(ids)} messages in {time.perf_counter() - t0:.1f}s")
            settings = replace(load_settings({"redis_url": server.url, "data_dir": tmp}, env={}),
                               secret_key=SECRET, cookie_secure=False, http_port=free_port(),
                               log_level="WARNING")
            if args.web_workers:
                settings = replace(settings, web_workers=args.web_workers)
            if args.web_threads:
                settings = replace(settings, web_threads=args.web_threads)
            component = WebComponent(settings, server.url)
            print(component.start_sync())
            sessions = SessionStore(r, settings.session_idle_timeout)
            cookies = [sessions.create(USER).token for _ in range(max(levels))]
            pages = {
                "healthz (baseline)": ["/healthz"],
                "inbox": ["/"],
                "message": [f"/message/{i}" for i in random.Random(1).sample(ids, min(200, len(ids)))],
                # Issue 17: the same pages never from the page cache (web/pagecache.py): each
                # request's URL is one no request had before, so each page is drawn in full.
                "inbox, drawn": [f"/?n={i}" for i in range(20_000)],
                "message, drawn": [f"/message/{i}?n={n}" for n, i in
                                   enumerate(random.Random(2).choices(ids, k=20_000))],
                # Issue 17: a search over the whole mailbox (its index built by the warm-up below).
                "search": ["/?q=sender+42", "/?q=report+77", "/?q=remote3.test"],
            }
            # Warm-up: each worker imports templates and opens its Redis pool.
            run_level(component.port, cookies[:4], pages["inbox"] + pages["message"][:4], 100)
            run_level(component.port, cookies[:1], pages["search"][:1], 2)  # builds the search index
            results: dict[str, dict[str, dict[str, float]]] = {}
            rounds: dict[str, dict[str, list[dict[str, float]]]] = {}
            for level in [x for x in levels for _ in range(args.rounds)]:
                for name, paths in pages.items():
                    assert component.process is not None and server.proc is not None
                    pids = server_pids(component.process.pid, server.proc.pid)
                    cpu0 = cpu_seconds(pids)
                    if use_wrk:
                        cell = run_level_wrk(component.port, cookies[:level], paths, args.seconds,
                                             Path(tmp))
                    else:
                        cell = run_level(component.port, cookies[:level], paths, args.requests)
                    cell["cpu_ms"] = (cpu_seconds(pids) - cpu0) * 1000 / cell["requests"]
                    rounds.setdefault(name, {}).setdefault(str(level), []).append(cell)
            for name, cells_by_level in rounds.items():
                for level_name, cells in cells_by_level.items():
                    median = {k: statistics.median(c[k] for c in cells) for k in cells[0]}
                    base_cells = rounds["healthz (baseline)"][level_name]
                    ratios = sorted(c["rps"] / b["rps"] for c, b in zip(cells, base_cells, strict=True))
                    median["rps_ratio"] = statistics.median(ratios)
                    median["rps_ratio_min"], median["rps_ratio_max"] = ratios[0], ratios[-1]
                    results.setdefault(name, {})[level_name] = median

            load = os.getloadavg()
            print(f"\nload average of the machine at the end: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) "
                  f"on {os.cpu_count()} CPUs")
            print(f"webmail, {len(ids)}-message mailbox, gunicorn {settings.web_workers} workers x "
                  f"{settings.web_threads} threads, load from "
                  + (f"wrk, {args.seconds:.0f}s per cell" if use_wrk
                     else f"Python threads, {args.requests} requests per cell"))
            print(f"{'page':<20}{'sessions':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
                  f"{'p95/base':>10}{'CPU ms/req':>12}{'CPU/base':>10}{'req/s / base (spread)':>24}")
            for name, printed in results.items():
                for level_key, m in printed.items():
                    base = results["healthz (baseline)"][level_key]
                    print(f"{name:<20}{level_key:>9}{m['rps']:>9.0f}{m['p50_ms']:>9.1f}{m['p95_ms']:>9.1f}"
                          f"{m['p95_ms'] / base['p95_ms']:>9.1f}x{m['cpu_ms']:>12.2f}"
                          f"{m['cpu_ms'] / base['cpu_ms']:>9.1f}x{m['rps_ratio']:>11.2f}x "
                          f"({m['rps_ratio_min']:.2f}-{m['rps_ratio_max']:.2f})")
            inbox10 = results["inbox"].get("10")
            if inbox10:
                verdict = "meets" if inbox10["p95_ms"] < TARGET_INBOX_P95_MS else "MISSES"
                print(f"\ninbox p95 at 10 sessions: {inbox10['p95_ms']:.1f} ms ({verdict} the "
                      f"{TARGET_INBOX_P95_MS:.0f} ms target)")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2))
        finally:
            if component is not None:
                component.stop_sync()
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
