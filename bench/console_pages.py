"""Admin console page times with N provisioned users (default 1,000,000).

Provisions the users the way bench/provision.py does (a CSV of well-formed
fake bcrypt hashes, `fallback provision` as a subprocess, against a fresh
redis-server configured like the embedded one), declares a failover of half
the mailstores, queues some outbound and forward mail, logs in to the console
through its real log-in form and times, through the Flask test client (the
whole app: session, CSRF guard, CSP, templates, one Redis round trip per
command), the median and the worst of R requests of each page: the
dashboard, the affected users' first page, a search by the start of an
address (the directory's bucket scan), a search by name@domain (the name
index), the CSV download's first 64 KiB, and the outbound and forward queue
lists.  Redis commands per request (INFO commandstats) are printed too.

    .venv/bin/python bench/console_pages.py               # 1,000,000 users
    .venv/bin/python bench/console_pages.py -n 100000 -r 5
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provision import write_csv  # noqa: E402
from fallback import ids  # noqa: E402
from fallback.config import load_settings  # noqa: E402
from fallback.ops import failover  # noqa: E402
from fallback.queues import forward, outbound  # noqa: E402
from tests.servers import RedisServer  # noqa: E402
from web import create_app  # noqa: E402

TOKEN = "bench-console-token-0123456789abcdef"
BODY = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: bench\r\n\r\nhello\r\n"
QUEUED = 200  # messages in each queue


def calls(r: redis.Redis) -> int:
    stats: Any = r.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def timed(client: Any, r: redis.Redis, url: str, rounds: int) -> tuple[float, float, int, int]:
    """(median ms, worst ms, status, Redis commands of one request)."""
    times = []
    status = 0
    commands = 0
    for _ in range(rounds):
        before = calls(r)
        t0 = time.perf_counter()
        resp = client.get(url, buffered=False)
        if url.endswith(".csv"):
            got = 0
            for chunk in resp.response:
                got += len(chunk)
                if got >= 65536:
                    break
        else:
            resp.get_data()
        times.append((time.perf_counter() - t0) * 1000)
        resp.close()
        status = resp.status_code
        commands = calls(r) - before - 1  # the INFO before is counted by the one after
    return statistics.median(times), max(times), status, commands


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="provisioned users")
    ap.add_argument("-r", type=int, default=11, help="requests per page (median)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis").start()
        try:
            r = redis.Redis.from_url(server.url)
            csv_path = work / "users.csv"
            write_csv(csv_path, args.n)
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "fallback", "provision", str(csv_path), "--redis-url",
                            server.url], check=True, capture_output=True)
            print(f"provisioned {args.n:,} users in {time.monotonic() - t0:.1f}s")
            failover.start(r, ["store0", "store1"])
            for i in range(QUEUED):
                outbound.submit(r, sender=f"user{i:07d}@d{i % 100}.example.com", mailstore="store0",
                                recipients=["x@example.org"], raw=BODY, msg_id=ids.new_id())
                forward.enqueue(r, [f"user{i * 4 + 2:07d}@d{(i * 4 + 2) % 100}.example.com"], ids.new_id(),
                                BODY, "someone@example.org")
            settings = load_settings({"redis_url": server.url, "data_dir": str(work / "data"),
                                      "secret_key": "bench-secret-0123456789-abcdefghijklmnop",
                                      "admin_token": TOKEN, "cookie_secure": False}, env={})
            app = create_app(settings, redis.Redis.from_url(server.url))
            client = app.test_client()
            form = client.get("/admin/login").get_data(as_text=True)
            csrf = re.search(r'name="csrf_token" value="([^"]*)"', form)
            assert csrf is not None
            done = client.post("/admin/login", data={"csrf_token": csrf.group(1), "token": TOKEN})
            assert done.status_code == 302, done.status_code
            pages = [("dashboard", "/admin/"), ("affected, first page", "/admin/affected"),
                     ("affected, search user00012", "/admin/affected?q=user00012"),
                     ("affected, search user0001234@d34.example.com",
                      "/admin/affected?q=user0001234@d34.example.com"),
                     ("affected.csv, first 64 KiB", "/admin/affected.csv"),
                     (f"outbound queue ({QUEUED})", "/admin/queues/outbound"),
                     (f"forward queue ({QUEUED})", "/admin/queues/forward")]
            print(f"{'page':48} {'median ms':>10} {'worst ms':>9} {'status':>6} {'commands':>9}")
            for name, url in pages:
                median, worst, status, commands = timed(client, r, url, args.r)
                print(f"{name:48} {median:10.1f} {worst:9.1f} {status:6d} {commands:9d}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
