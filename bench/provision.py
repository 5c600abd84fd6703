"""Provisioning at scale: N mailboxes (default 1,000,000) with bcrypt-length hashes, end to end.

Writes a CSV of fake but well-formed `{BLF-CRYPT}$2y$10$...` hashes (computing a
million real bcrypts would take days; import only checks their form), runs
`fallback provision` on it as a subprocess against a fresh redis-server
configured like the embedded one (AOF, appendfsync always, noeviction, the
listpack settings), and prints the wall time and Redis bytes per mailbox
(used_memory after minus before, divided by N).

With `--cluster` the same import also runs against a real Redis Cluster
(tests.servers.RedisClusterServers: 3 primaries with one replica each, same
per-node settings) through a `redis+cluster://` URL, in the same run, and the
cluster / single-server ratios are printed.  Memory on the cluster is the sum of
used_memory over the primaries; the replicas hold the same data again, so the
total RAM of the cluster is about twice that (measured and printed too).

    .venv/bin/python bench/provision.py                  # 1,000,000 mailboxes, single redis-server
    .venv/bin/python bench/provision.py --cluster        # single server, then the cluster
    .venv/bin/python bench/provision.py --cluster-only   # only the cluster
    .venv/bin/python bench/provision.py -n 100000        # a quick run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisClusterServers, RedisServer  # noqa: E402

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


@dataclass
class Result:
    seconds: float
    bytes_per_mailbox: float
    rerun_seconds: float
    replica_bytes_per_mailbox: float | None = None  # cluster only: the same delta over the replicas


def used_memory(clients: list[redis.Redis]) -> tuple[int, int]:
    """(used_memory, the part of it that is replication buffers), summed over `clients`.

    The replication buffer (backlog plus what is queued for replicas) is a fixed
    cost per primary, at most repl-backlog-size (1 MiB by default), not a cost
    per mailbox; it is printed apart.
    """
    infos = [c.info("memory") for c in clients]
    used = sum(int(i["used_memory"]) for i in infos)
    repl = sum(int(i.get("mem_replication_backlog", 0)) + int(i.get("mem_clients_slaves", 0)) for i in infos)
    return used, repl


def wait_replicas_synced(primaries: list[redis.Redis], replicas: list[redis.Redis],
                         timeout: float = 120) -> None:
    """Until every replica's link is up and it has applied everything its primary has written.

    A fresh cluster's replicas start their first sync a few seconds after
    `cluster create` (repl-diskless-sync-delay), while the primaries already
    count them as connected: measuring before that would find them empty.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        offsets = {int(c.info("replication")["master_repl_offset"]) for c in primaries}
        states = [c.info("replication") for c in replicas]
        if all(s.get("master_link_status") == "up" and int(s["slave_repl_offset"]) in offsets
               for s in states):
            return
        time.sleep(0.2)
    raise RuntimeError("the replicas did not catch up with their primaries")


def run_import(label: str, url: str, csv_path: Path, n: int, primaries: list[redis.Redis],
               replicas: list[redis.Redis]) -> Result | None:
    """`fallback provision` against `url`; memory is the delta summed over `primaries` (and `replicas`)."""
    if replicas:
        wait_replicas_synced(primaries, replicas)
    (before, before_buf), (before_rep, before_rep_buf) = used_memory(primaries), used_memory(replicas)
    cmd = [sys.executable, "-m", "fallback", "provision", str(csv_path), "--redis-url", url]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        print(f"{label}: `fallback provision` failed (exit {done.returncode})")
        print(done.stdout, done.stderr, sep="\n")
        return None
    if replicas:
        wait_replicas_synced(primaries, replicas)
    (after, after_buf), (after_rep, after_rep_buf) = used_memory(primaries), used_memory(replicas)
    buffers = after_buf - before_buf
    per = (after - before - buffers) / n
    print(done.stdout.strip())
    print(f"{label}: {n:,} mailboxes in {seconds:.1f}s ({n / seconds:,.0f}/s); "
          f"Redis {after - before:,} bytes"
          + (f" (sum over the primaries; {buffers:,} of it replication buffers, left out)"
             if replicas else "")
          + f" = {per:.1f} bytes/mailbox")
    rep_per = None
    if replicas:
        rep_buffers = after_rep_buf - before_rep_buf
        rep_per = (after_rep - before_rep - rep_buffers) / n
        print(f"{label}: replicas {after_rep - before_rep:,} bytes ({rep_buffers:,} replication buffers, "
              f"left out) = {rep_per:.1f} bytes/mailbox; "
              f"primaries + replicas = {per + rep_per:.1f} bytes/mailbox")
    if n >= 1_000_000:
        print(f"{label}: targets <= {TARGET_SECONDS:.0f}s "
              f"{'met' if seconds <= TARGET_SECONDS else 'MISSED'}, "
              f"<= {TARGET_BYTES:.0f} bytes/mailbox {'met' if per <= TARGET_BYTES else 'MISSED'}")
    # Re-run: nothing changes, everything is counted as unchanged.
    t0 = time.monotonic()
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rerun = time.monotonic() - t0
    unchanged = f"{n:,}".replace(",", "") in again.stdout.replace(",", "")
    print(f"{label}: re-run (idempotent): {rerun:.1f}s, exit {again.returncode}"
          + ("" if unchanged else f"\n{again.stdout}{again.stderr}"))
    return Result(seconds, per, rerun, rep_per)


def single(work: Path, csv_path: Path, n: int) -> Result | None:
    server = RedisServer(work / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        result = run_import("single redis-server", server.url, csv_path, n, [r], [])
        enc = {r.object("encoding", f"dir:{{{b}}}") for b in range(0, 65536, 4099)}
        print(f"directory bucket encodings (sample): {sorted(e.decode() for e in enc if e)}")
        r.close()
        return result
    finally:
        server.stop()


def cluster(work: Path, csv_path: Path, n: int) -> Result | None:
    t0 = time.monotonic()
    servers = RedisClusterServers(work / "cluster").start()
    print(f"cluster: {len(servers.nodes)} redis-server processes "
          f"({servers.primaries} primaries + {servers.replicas} replica each) "
          f"up in {time.monotonic() - t0:.1f}s")
    try:
        clients = [servers.client(node) for node in servers.nodes]
        roles = [c.info("replication")["role"] for c in clients]
        primaries = [c for c, role in zip(clients, roles, strict=True) if role == "master"]
        replicas = [c for c, role in zip(clients, roles, strict=True) if role != "master"]
        result = run_import("cluster", servers.url, csv_path, n, primaries, replicas)
        rc = redis.RedisCluster(host="127.0.0.1", port=servers.nodes[0].port)
        enc = {rc.object("encoding", f"dir:{{{b}}}") for b in range(0, 65536, 4099)}
        print(f"cluster: directory bucket encodings (sample): {sorted(e.decode() for e in enc if e)}")
        keys_per = [int(c.dbsize()) for c in primaries]
        print(f"cluster: keys per primary {keys_per}")
        rc.close()
        for c in clients:
            c.close()
        return result
    finally:
        servers.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000, help="mailboxes (default 1,000,000)")
    ap.add_argument("--cluster", action="store_true",
                    help="also import into a 3-primary + 3-replica Redis Cluster and print the ratios")
    ap.add_argument("--cluster-only", action="store_true", help="only the cluster")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-provision-"))
    csv_path = work / "users.csv"
    t0 = time.monotonic()
    write_csv(csv_path, args.n)
    print(f"wrote {args.n:,} lines ({csv_path.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f}s")
    try:
        one = None if args.cluster_only else single(work, csv_path, args.n)
        many = cluster(work, csv_path, args.n) if args.cluster or args.cluster_only else None
        if one is not None and many is not None:
            print(f"cluster / single: import time {many.seconds / one.seconds:.2f}x, "
                  f"bytes per mailbox (primaries) {many.bytes_per_mailbox / one.bytes_per_mailbox:.2f}x, "
                  f"re-run {many.rerun_seconds / one.rerun_seconds:.2f}x")
        want_cluster = args.cluster or args.cluster_only
        failed = (not args.cluster_only and one is None) or (want_cluster and many is None)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
