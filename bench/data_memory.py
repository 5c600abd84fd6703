"""Receiver memory during DATA: how many copies of a large message it holds at once.

A real redis-server (appendonly yes, appendfsync always) and the receiver as
its own process (`fallback smtp`, one process, --max-message-size 50MiB); then
N clients (smtplib, one thread each, from 127.0.0.1) send one message of SIZE
each at the same time, each to its own mailbox.  The receiver's peak resident
memory (VmHWM in /proc/PID/status) minus its resident memory before the load,
divided by the bytes of all messages in flight, is the number of copies of a
message the receiver holds at its peak: 1 means each message is held once.
Redis' own memory (which keeps the stored copies) is another process and is
not counted.  Every message is checked afterwards: stored once, its bytes
intact after our Received: line.

    .venv/bin/python bench/data_memory.py                       # 20 x 40 MiB
    .venv/bin/python bench/data_memory.py --clients 5 --size-mib 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer, free_port, stop_pid, wait_port  # noqa: E402

MIB = 1024 * 1024


def proc_status(pid: int, field: str) -> int:
    """A VmRSS/VmHWM line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def message(size: int) -> bytes:
    """A plain message of about `size` bytes: base64-like lines, as an attachment arrives."""
    line = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0"
            + b"\r\n")
    head = b"From: bench@remote.test\r\nTo: someone@example.com\r\nSubject: big\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


def provision(url: str, addresses: list[str]) -> None:
    import redis

    from fallback.mailbox import directory, passwords

    r = redis.Redis.from_url(url)
    d = directory.Directory(r, directory.ensure_buckets(r, 1024))
    stored = passwords.hash_password("x", "SHA256-CRYPT")
    for address in addresses:
        d.put(directory.Mailbox(address, "default", stored))
    r.close()


def send_all(port: int, addresses: list[str], raw: bytes) -> list[str]:
    """One thread per address, all released at once; returns the failures."""
    start = threading.Barrier(len(addresses))
    failures: list[str] = []

    def one(address: str) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=600) as client:
                client.ehlo("bench.test")
                start.wait(timeout=60)
                client.sendmail("bench@remote.test", [address], raw)
        except Exception as exc:
            failures.append(f"{address}: {exc!r}")

    threads = [threading.Thread(target=one, args=(a,)) for a in addresses]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return failures


def check_stored(url: str, addresses: list[str], raw: bytes) -> int:
    """How many mailboxes hold the message exactly once, intact after our Received: line."""
    import redis

    from fallback import keys
    from fallback.mailbox import fields, record

    r = redis.Redis.from_url(url)
    good = 0
    for address in addresses:
        ids = r.zrange(keys.folder(address, fields.INBOX), 0, -1)
        if len(ids) == 1:
            stored = record.read_raw(r, keys.message(address, ids[0].decode())) or b""
            good += stored.endswith(raw) and stored.startswith(b"Received: ")
    r.close()
    return good


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--size-mib", type=int, default=40)
    args = ap.parse_args()
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-data-"))
    redis_server = RedisServer(work / "redis").start()
    addresses = [f"big{i}@example.com" for i in range(args.clients)]
    provision(redis_server.url, addresses)
    raw = message(size)
    port = free_port()
    env = {**os.environ, "FALLBACK_REDIS_URL": redis_server.url, "FALLBACK_MAIL_LOG": str(work / "mail.log")}
    cmd = [sys.executable, "-m", "fallback", "smtp", "--smtp-port", str(port), "--smtp-workers", "1",
           "--hostname", "bench.test", "--max-message-size", "50MiB",
           "--max-connections-per-ip", str(args.clients + 10), "--connection-timeout", "900",
           "--idle-timeout", "600"]
    receiver = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=open(work / "receiver.err", "wb"))  # noqa: SIM115
    try:
        wait_port(port, timeout=60)
        time.sleep(1.0)  # let start-up allocations settle before the idle figure
        idle = proc_status(receiver.pid, "VmRSS")
        started = time.monotonic()
        failures = send_all(port, addresses, raw)
        took = time.monotonic() - started
        peak = proc_status(receiver.pid, "VmHWM")
        good = check_stored(redis_server.url, addresses, raw)
    finally:
        stop_pid(receiver)
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    in_flight = args.clients * len(raw)
    print(f"receiver (fallback smtp, 1 process), {args.clients} concurrent messages of "
          f"{len(raw) / MIB:.1f} MiB, redis appendfsync always")
    print(f"idle RSS {idle / MIB:.0f} MiB, peak RSS {peak / MIB:.0f} MiB, growth "
          f"{(peak - idle) / MIB:.0f} MiB for {in_flight / MIB:.0f} MiB in flight")
    print(f"copies per message at the peak: {(peak - idle) / in_flight:.2f}")
    print(f"stored intact: {good} of {args.clients}; failed sends: {len(failures)}; took {took:.1f}s")
    for failure in failures[:5]:
        print("  " + failure)
    return 0 if good == args.clients and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
