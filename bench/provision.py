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

Issue 14 (single server, after the mailboxes, in the same redis-server):
M aliases (default 200,000) in a Postfix virtual(5) file are imported with
`fallback provision FILE --format virtual` (60 % one target that is a
mailbox, 10 % one outside address, 25 % three targets: two mailboxes and an
outside address, a fifth of those also naming another alias; 1 % catch-alls
`@domain` of domains of their own; some continuation lines), with seconds and
bytes per alias.  Then the mailbox file with 1 % changes (0.5 % removed,
0.25 % added, 0.25 % new password) is run with `--sync --dry-run` (seconds;
nothing changes) and `--sync` (seconds and the counts it reports), and, where
the virtual format takes --sync, the same for the aliases with 1 % changes.

    .venv/bin/python bench/provision.py                  # 1,000,000 mailboxes, single redis-server
    .venv/bin/python bench/provision.py --cluster        # single server, then the cluster
    .venv/bin/python bench/provision.py --cluster-only   # only the cluster
    .venv/bin/python bench/provision.py -n 100000        # a quick run
    .venv/bin/python bench/provision.py --mailboxes 100000 --aliases 20000   # quick, with issue 14
    .venv/bin/python bench/provision.py --aliases 0      # mailboxes only, as before issue 14
    .venv/bin/python bench/provision.py --aliases 0 --domains 100000   # many small domains
"""

from __future__ import annotations

import argparse
import binascii
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisClusterServers, RedisServer, free_port, stop_pid  # noqa: E402

_BCRYPT_ALPHABET = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
TARGET_SECONDS = 10.0  # issue 17, end to end through the CLI
TARGET_BYTES = {"stock": 100.0, "embedded": 90.0, "cluster": 100.0}


def fake_bcrypt_hashes(n: int) -> list[str]:
    """n distinct, well-formed bcrypt strings, as bcrypt writes them: a random 16-byte salt and
    23-byte digest in bcrypt's base64 (22 + 31 characters, the spare low bits zero)."""
    table = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
                            _BCRYPT_ALPHABET)
    blob = os.urandom(39 * n)
    b2a = binascii.b2a_base64
    return ["{BLF-CRYPT}$2y$10$" + (b2a(blob[39 * i : 39 * i + 16], newline=False)[:22]
                                    + b2a(blob[39 * i + 16 : 39 * i + 39], newline=False)[:31]
                                    ).translate(table).decode()
            for i in range(n)]


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
    t0, cpu0 = time.monotonic(), children_cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds, cpu = time.monotonic() - t0, children_cpu() - cpu0
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
    # CPU seconds of the CLI process too: less swayed than wall time by other load on the machine.
    print(f"{label}: {n:,} mailboxes in {seconds:.1f}s ({n / seconds:,.0f}/s; CLI CPU {cpu:.1f}s); "
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
        target = TARGET_BYTES[label.split()[0]]
        print(f"{label}: targets <= {TARGET_SECONDS:.0f}s "
              f"{'met' if seconds <= TARGET_SECONDS else 'MISSED'}, "
              f"<= {target:.0f} bytes/mailbox {'met' if per <= target else 'MISSED'}")
    if not replicas:
        in_dir = key_bytes(primaries[0], "dir:{*}") / n
        print(f"{label}: of that, by MEMORY USAGE: {in_dir:.1f} bytes/mailbox "
              f"in the directory's buckets, {key_bytes(primaries[0], 'dirn:*') / n:.1f} in the name "
              "index for suggestions (issue 15, dirindex.py)")
    # Re-run: nothing changes, everything is counted as unchanged.
    t0 = time.monotonic()
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rerun = time.monotonic() - t0
    unchanged = f"{n:,}".replace(",", "") in again.stdout.replace(",", "")
    print(f"{label}: re-run (idempotent): {rerun:.1f}s, exit {again.returncode}"
          + ("" if unchanged else f"\n{again.stdout}{again.stderr}"))
    return Result(seconds, per, rerun, rep_per)


def mailbox_address(i: int, domains: int = 100) -> str:
    """The address of line i of write_csv's file."""
    return f"user{i:07d}@d{i % domains}.example.com"


def write_changed_csv(path: Path, n: int, source: Path) -> tuple[int, int, int]:
    """`source` (write_csv's file of n) with 1 % changes: every 200th mailbox removed (0.5 %),
    every 400th (offset 1) a new password (0.25 %), n/400 new mailboxes appended (0.25 %).

    Returns (removed, changed, added) as the sync should report them.
    """
    added = n // 400
    fresh = iter(fake_bcrypt_hashes(n // 400 + 1 + added))
    removed = changed = 0
    with open(source, encoding="ascii") as src, open(path, "w", encoding="ascii") as out:
        out.write(src.readline())  # the header
        for i, line in enumerate(src):
            if i % 200 == 0:
                removed += 1
            elif i % 400 == 1:
                address, _, rest = line.split(",", 2)
                out.write(f"{address},{next(fresh)},{rest}")
                changed += 1
            else:
                out.write(line)
        out.writelines(f"{mailbox_address(n + k)},{next(fresh)},store{(n + k) % 4}\n" for k in range(added))
    return removed, changed, added


def alias_line(i: int, n: int, version: int = 0) -> str:
    """Alias i of write_virtual's file, over a directory of n mailboxes; `version` changes its targets.

    The mix: i % 20 in 0..11 one mailbox; 12..13 one outside address; 14..18 two
    mailboxes and an outside address (on a continuation line), 18 also naming
    alias i-18 (one mailbox: a chain of two, as list -> person); 19 a
    catch-all of a domain of its own every fifth time, else one mailbox.
    """
    kind = i % 20
    box = mailbox_address((i * 7 + version) % n)
    if kind == 19 and i % 100 == 99:
        return f"@c{i:06d}.example.org\t{box}\n"
    name = f"list{i:06d}@d{i % 100}.example.com"
    if kind < 12 or kind == 19:
        return f"{name}\t{box}\n"
    outside = f"person{i + version}@partner{i % 50}.example.net"
    if kind < 14:
        return f"{name}\t{outside}\n"
    second = mailbox_address((i * 13 + 1) % n)
    chain = f", list{i - 18:06d}@d{(i - 18) % 100}.example.com" if kind == 18 else ""
    return f"{name}\t{box}, {second},\n\t{outside}{chain}\n"


def write_virtual(path: Path, m: int, n: int) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(f"# {m:,} aliases over {n:,} mailboxes (bench/provision.py)\n")
        fh.writelines(alias_line(i, n) for i in range(m))


def write_changed_virtual(path: Path, m: int, n: int) -> tuple[int, int, int]:
    """write_virtual's file with 1 %: 0.5 % removed, 0.25 % new targets, 0.25 % new aliases.

    Removed are the ones with i % 200 == 3 (one mailbox each, so no chain loses its end).
    """
    removed = changed = 0
    with open(path, "w", encoding="ascii") as fh:
        fh.write(f"# {m:,} aliases over {n:,} mailboxes, 1 % changed (bench/provision.py)\n")
        for i in range(m):
            if i % 200 == 3:
                removed += 1
            elif i % 400 == 5:
                fh.write(alias_line(i, n, version=1))
                changed += 1
            else:
                fh.write(alias_line(i, n))
        added = m // 400
        fh.writelines(alias_line(m + 20 * k, n) for k in range(added))  # i % 20 == m % 20
    return removed, changed, added


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return time.monotonic() - t0, done


def sync_run(label: str, url: str, path: Path, fmt: str, dry_run: bool, report: Path,
             expected: tuple[int, int, int]) -> bool:
    """One `fallback provision --sync [--dry-run]`; prints seconds, its table and the counts."""
    cmd = [sys.executable, "-m", "fallback", "provision", str(path), "--format", fmt, "--redis-url", url,
           "--sync", "--report", str(report)] + (["--dry-run"] if dry_run else [])
    seconds, done = timed(cmd)
    what = f"{label} --sync{' --dry-run' if dry_run else ''}"
    if done.returncode != 0:
        print(f"{what}: exit {done.returncode} after {seconds:.1f}s")
        print(done.stdout.strip(), done.stderr.strip(), sep="\n")
        return False
    got = json.loads(report.read_text(encoding="utf-8"))
    counts = (len(got["removed"]), len(got["changed"]), len(got["added"]))
    print("\n".join(done.stdout.strip().splitlines()[:6]))
    print(f"{what}: {seconds:.1f}s; before {got['before']:,}, removed {counts[0]:,}, "
          f"changed {counts[1]:,}, added {counts[2]:,}, unchanged {got['unchanged']:,}"
          + ("" if counts == expected else f" -- EXPECTED removed/changed/added {expected}"))
    return counts == expected


def aliases_and_sync(work: Path, url: str, r: redis.Redis, csv_path: Path, n: int, m: int) -> bool:
    """Issue 14's figures on the server that already holds the n mailboxes of `csv_path`."""
    ok = True
    virtual = work / "virtual"
    t0 = time.monotonic()
    write_virtual(virtual, m, n)
    print(f"wrote {m:,} aliases ({virtual.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f}s")
    before, _ = used_memory([r])
    seconds, done = timed([sys.executable, "-m", "fallback", "provision", str(virtual), "--format",
                           "virtual", "--redis-url", url])
    after, _ = used_memory([r])
    print(done.stdout.strip())
    if done.returncode != 0:
        print(f"aliases: `fallback provision --format virtual` failed (exit {done.returncode})")
        print(done.stderr.strip())
        return False
    print(f"aliases: {m:,} in {seconds:.1f}s ({m / seconds:,.0f}/s); Redis {after - before:,} bytes "
          f"= {(after - before) / m:.1f} bytes/alias")
    enc = {r.object("encoding", f"alias:{{{b}}}") for b in range(0, 65536, 4099)}
    print(f"alias bucket encodings (sample): {sorted(e.decode() for e in enc if e)}")

    changed_csv = work / "users-1pct.csv"
    expected = write_changed_csv(changed_csv, n, csv_path)
    report = work / "sync.json"
    before, _ = used_memory([r])
    ok &= sync_run("mailboxes 1 %", url, changed_csv, "csv", True, report, expected)
    grew = used_memory([r])[0] - before
    print(f"mailboxes 1 % --sync --dry-run: Redis grew by {grew:,} bytes (nothing is written)")
    ok &= grew < 1_000_000  # allocator and client-buffer noise only
    ok &= sync_run("mailboxes 1 %", url, changed_csv, "csv", False, report, expected)

    changed_virtual = work / "virtual-1pct"
    expected = write_changed_virtual(changed_virtual, m, n)
    probe = subprocess.run([sys.executable, "-m", "fallback", "provision", str(changed_virtual), "--format",
                            "virtual", "--redis-url", url, "--sync", "--dry-run"],
                           capture_output=True, text=True, check=False)
    if "do not take virtual files" in probe.stderr:
        print("aliases 1 % --sync: not measured (this checkout's provision refuses --sync of a "
              f"virtual file: {probe.stderr.strip()})")
        return ok
    ok &= sync_run("aliases 1 %", url, changed_virtual, "virtual", True, report, expected)
    ok &= sync_run("aliases 1 %", url, changed_virtual, "virtual", False, report, expected)
    return ok


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def key_bytes(r: redis.Redis, pattern: str) -> int:
    return sum(int(r.memory_usage(k, samples=0) or 0) for k in r.scan_iter(pattern, count=5000))


class StockRedis:
    """redis-server with its default configuration (issue 17): no listpack settings, no AOF."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(300):
            try:
                if int(client.info("server")["process_id"]) == self.proc.pid:
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("the stock redis-server did not start")

    def stop(self) -> None:
        stop_pid(self.proc)


def single(work: Path, csv_path: Path, n: int, m: int = 0,
           kind: str = "embedded") -> tuple[Result | None, bool]:
    server: StockRedis | RedisServer = (StockRedis(work / "stock") if kind == "stock"
                                        # a directory of its own each round: its AOF would
                                        # bring the last round's mailboxes back
                                        else RedisServer(work / f"redis-{time.monotonic_ns()}").start())
    try:
        r = redis.Redis.from_url(server.url)
        result = run_import(f"{kind} redis-server", server.url, csv_path, n, [r], [])
        enc = {r.object("encoding", f"dir:{{{b}}}") for b in range(0, 65536, 4099)}
        print(f"directory bucket encodings (sample): {sorted(e.decode() for e in enc if e)}")
        ok = result is not None and (m == 0 or aliases_and_sync(work, server.url, r, csv_path, n, m))
        r.close()
        return result, ok
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
    ap.add_argument("-n", "--mailboxes", dest="n", type=int, default=1_000_000,
                    help="mailboxes (default 1,000,000)")
    ap.add_argument("--aliases", type=int, default=200_000,
                    help="issue 14: aliases, then the 1 %% syncs (default 200,000; 0 skips them)")
    ap.add_argument("--cluster", action="store_true",
                    help="also import into a 3-primary + 3-replica Redis Cluster and print the ratios")
    ap.add_argument("--cluster-only", action="store_true", help="only the cluster")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--server", choices=("stock", "embedded", "both"), default="both",
                    help="issue 17: a default-configured redis-server, one with the embedded Redis' "
                    "settings (AOF always, listpack sizes), or both in turn (default)")
    ap.add_argument("--rounds", type=int, default=1, help="import rounds per server, interleaved")
    ap.add_argument("--domains", type=int, default=100,
                    help="issue 17: domains the mailboxes are spread over (default 100; e.g. 100000 "
                    "for many small ones; other than 100 only with --aliases 0)")
    args = ap.parse_args()
    if args.domains != 100 and args.aliases:
        ap.error("--domains other than 100 needs --aliases 0 (the aliases name 100 domains)")
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-provision-"))
    csv_path = work / "users.csv"
    t0 = time.monotonic()
    write_csv(csv_path, args.n, args.domains)
    print(f"wrote {args.n:,} lines ({csv_path.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f}s")
    try:
        kinds = ["stock", "embedded"] if args.server == "both" else [args.server]
        times: dict[str, list[float]] = {k: [] for k in kinds}
        one, one_ok = None, True
        for k in range(0 if args.cluster_only else args.rounds):
            for kind in kinds:  # interleaved: the machine's other load falls on both alike
                result, ok = single(work, csv_path, args.n, args.aliases if k == 0 else 0, kind)
                one, one_ok = one or result, one_ok and ok
                if result is not None:
                    times[kind].append(result.seconds)
        for kind, got in times.items():
            if len(got) > 1:
                print(f"{kind}: {len(got)} rounds, median {statistics.median(got):.1f}s "
                      f"(spread {min(got):.1f}-{max(got):.1f}s)")
        many = cluster(work, csv_path, args.n) if args.cluster or args.cluster_only else None
        if one is not None and many is not None:
            print(f"cluster / single: import time {many.seconds / one.seconds:.2f}x, "
                  f"bytes per mailbox (primaries) {many.bytes_per_mailbox / one.bytes_per_mailbox:.2f}x, "
                  f"re-run {many.rerun_seconds / one.rerun_seconds:.2f}x")
        want_cluster = args.cluster or args.cluster_only
        failed = (not args.cluster_only and not one_ok) or (want_cluster and many is None)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
