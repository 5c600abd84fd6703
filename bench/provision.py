"""Provisioning at scale: N mailboxes (default 1,000,000) with bcrypt-length hashes, end to end.

Writes a CSV of fake but well-formed `{BLF-CRYPT}$2y$10$...` hashes (computing a
million real bcrypts would take days; import only checks their form), runs
`fallback provision` on it as a subprocess against a fresh redis-server
configured like the embedded one (AOF, appendfsync always, noeviction, the
listpack settings), and prints the wall time and Redis bytes per mailbox
(used_memory after minus before, divided by N).

    .venv/bin/python bench/provision.py            # 1,000,000 mailboxes
    .venv/bin/python bench/provision.py -n 100000  # a quick run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer  # noqa: E402

_BCRYPT_ALPHABET = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
TARGET_SECONDS = 30.0
TARGET_BYTES = 140.0


def fake_bcrypt_hashes(n: int) -> list[str]:
    """n distinct, well-formed bcrypt strings: 22 salt + 31 hash chars from bcrypt's alphabet."""
    table = bytes(_BCRYPT_ALPHABET[b % 64] for b in range(256))
    blob = os.urandom(53 * n).translate(table)
    # bcrypt's last salt character only carries 2 bits: keep it in the valid set.
    out = []
    for i in range(n):
        chunk = blob[53 * i : 53 * i + 53]
        salt = chunk[:21] + b"."  # '.' is a valid final salt char (00 low bits)
        out.append("{BLF-CRYPT}$2y$10$" + (salt + chunk[22:]).decode())
    return out


def write_csv(path: Path, n: int, domains: int = 100, mailstores: int = 4) -> None:
    hashes = fake_bcrypt_hashes(n)
    with open(path, "w", encoding="ascii") as fh:
        fh.write("address,password,mailstore\n")
        fh.writelines(
            f"user{i:07d}@d{i % domains}.example.com,{hashes[i]},store{i % mailstores}\n" for i in range(n)
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000, help="mailboxes (default 1,000,000)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-provision-"))
    csv_path = work / "users.csv"
    t0 = time.monotonic()
    write_csv(csv_path, args.n)
    print(f"wrote {args.n:,} lines ({csv_path.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f}s")
    server = RedisServer(work / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        before = int(r.info("memory")["used_memory"])
        fallback = [sys.executable, "-m", "fallback"]
        cmd = [*fallback, "provision", str(csv_path), "--redis-url", server.url]
        t0 = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - t0
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n")
            return 1
        after = int(r.info("memory")["used_memory"])
        per = (after - before) / args.n
        print(done.stdout.strip())
        print(f"provision: {args.n:,} mailboxes in {seconds:.1f}s ({args.n / seconds:,.0f}/s); "
              f"Redis {after - before:,} bytes = {per:.1f} bytes/mailbox")
        enc = {r.object("encoding", f"dir:{{{n}}}") for n in range(0, 65536, 4099)}
        print(f"directory bucket encodings (sample): {sorted(e.decode() for e in enc if e)}")
        if args.n >= 1_000_000:
            print(f"targets: <= {TARGET_SECONDS:.0f}s {'met' if seconds <= TARGET_SECONDS else 'MISSED'}, "
                  f"<= {TARGET_BYTES:.0f} bytes/mailbox {'met' if per <= TARGET_BYTES else 'MISSED'}")
        # Re-run: nothing changes, everything is counted as unchanged.
        t0 = time.monotonic()
        again = subprocess.run(cmd, capture_output=True, text=True, check=False)
        print(f"re-run (idempotent): {time.monotonic() - t0:.1f}s, exit {again.returncode}")
        r.close()
    finally:
        server.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
