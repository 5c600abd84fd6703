"""SMTP intake throughput: the durable receiver against a no-op aiosmtpd handler and smtp-sink.

For 4 KiB and 100 KiB messages at 1, 10 and 50 concurrent connections, Postfix's
`smtp-source` (a load generator none of us wrote) sends a fixed number of
messages to each server, all started in this same run:

- durable: the SMTP part of `fallback up` (its SmtpComponent: same code,
  settings, mail log to a file and metrics counters) storing into a fresh
  redis-server with `appendonly yes`, `appendfsync always`: every 250 waits
  for an fsynced write;
- no-op: plain aiosmtpd whose handle_DATA answers 250 and stores nothing;
- lean: the same with its DATA step answering 250 and storing (and logging)
  nothing.  The receiver reads SMTP with less work than stock aiosmtpd
  (fallback/intake/smtpsyntax.py), so this, not the no-op, shows what storing costs;
- smtp-sink: Postfix's sink, the ceiling of an SMTP server that stores nothing.

Each server runs in its own process (`--serve KIND PORT`).  Prints messages/s,
the durable/no-op ratio (target: >= 0.8 at 10 and 50 connections) and the
durable/lean ratio.

    .venv/bin/python bench/smtp_ingest.py                 # the full table
    .venv/bin/python bench/smtp_ingest.py --messages 500  # quicker

Issue 16, the message trace's cost: `--trace-rounds N` runs two durable receivers
instead, one with the trace on (14 d) and one off (`--trace-retention 0`), both
flushing every second, in N interleaved rounds (4 KiB, 10 connections or the one
`--concurrency` given); prints each round's on/off, their median, the receivers'
CPU per message (/proc) and MEMORY USAGE of the trace keys per message.

    .venv/bin/python bench/smtp_ingest.py --trace-rounds 20 --messages 2000 [--concurrency 50]

`--trace-flush N` measures the trace's own work in this process, which other load disturbs
far less: N rounds of 20,000 intake events through the receiver's MailLog -> MailCounters,
flushed every 400 events (50 connections' second) into a redis-server, trace on and off
interleaved; prints this thread's CPU per event (time.thread_time: the Python side, awaiting
Redis excluded) and redis-server's time in the trace's EVAL per event (INFO commandstats).

    .venv/bin/python bench/smtp_ingest.py --trace-flush 7

Issue 17: `--postfix-rounds N` compares the durable receiver with a queue-only Postfix
backup MX (bench/postfix_mx.py) and the no-op, in N interleaved rounds, with one new
connection per message and with kept connections (bench/versus_postfix.py); prints
messages/s and CPU per message of each, and the receiver/postfix and receiver/no-op ratios.

    .venv/bin/python bench/smtp_ingest.py --postfix-rounds 5 --messages 2000   # 10 and 50 connections

`--instructions N` counts the durable receiver's and the no-op's instructions per message
under callgrind, which other load does not change (bench/smtp_instructions.py).

    .venv/bin/python bench/smtp_ingest.py --instructions 300 [--concurrency 10] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer, free_port, postfix_env, postfix_tool, stop_pid, wait_port  # noqa: E402

RCPT = "bench@example.com"
SIZES = {"4KiB": 4 * 1024, "100KiB": 100 * 1024}
CONCURRENCY = (1, 10, 50)
SETTLE = 1.3  # seconds after a trace round: longer than the flush interval


# --- the servers, each in its own process --------------------------------------------

async def serve_durable(port: int, redis_url: str, mail_log: str, store: bool = True,
                        trace_retention: str | None = None, compression: str | None = None) -> None:
    from fallback.cli import setup_logging
    from fallback.config import load_settings
    from fallback.mailbox import directory
    from fallback.redisconn import async_client
    from fallback.service import SmtpComponent

    settings = load_settings({"redis_url": redis_url, "smtp_port": port, "hostname": "bench.test",
                              "smtp_workers": 1, "mail_log": mail_log,
                              "max_connections_per_ip": 1000, "max_commands": 1_000_000,
                              "max_messages_per_ip_per_minute": 0,
                              # Issue 16: the trace on (14d) or off (0), flushed every second so
                              # that its writes fall inside even a short run.
                              **({"trace_retention": trace_retention, "metrics_flush_interval": "1"}
                                 if trace_retention is not None else {}),
                              # Issue 17: stored bytes in zstd (the default) or as received.
                              **({"store_compression": compression} if compression else {})}, env={})
    setup_logging(settings)
    r = async_client(redis_url)
    buckets = await directory.ensure_buckets_async(r, settings.directory_buckets)
    component = SmtpComponent(settings, r, buckets, url=redis_url)
    await component.start()
    if not store:
        async def answer_only(*_: object) -> str:
            return "250 2.0.0 OK"

        # aiosmtpd looks the hook up for each new connection, and none has come yet.
        assert component.server is not None
        component.server.handler.handle_DATA = answer_only  # type: ignore[method-assign,assignment]
    await asyncio.Event().wait()


async def serve_noop(port: int, reuse_port: bool = False) -> None:
    """aiosmtpd answering 250 to every DATA and storing nothing (reuse_port: one of several)."""
    from aiosmtpd.smtp import SMTP

    class NoOp:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(NoOp(), hostname="noop.test", data_size_limit=None),
                             host="127.0.0.1", port=port, reuse_port=reuse_port or None)
    await asyncio.Event().wait()


def start_server(kind: str, port: int, redis_url: str = "",
                 work: Path | None = None) -> subprocess.Popen[bytes]:
    if kind == "sink":
        # -u root: it is started as root here and must not switch to a `postfix` user.
        cmd = [*postfix_tool("smtp-sink"), "-c", "-u", os.environ.get("USER", "root"),
               f"127.0.0.1:{port}", "256"]
        proc = subprocess.Popen(cmd, env=postfix_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        mail_log = str((work or Path(tempfile.gettempdir())) / f"{kind}-mail.log")
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port), redis_url, mail_log],
                                stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc


# --- the load ------------------------------------------------------------------------

def drive(port: int, size: int, sessions: int, messages: int, keep: bool = True) -> float:
    """messages/s that smtp-source achieved (keep: connections kept open between messages,
    `-d`; else one new connection per message, with its greeting, EHLO and QUIT)."""
    cmd = [*postfix_tool("smtp-source"), *(["-d"] if keep else []), "-s", str(sessions), "-m", str(messages),
           "-l", str(size), "-f", "load@remote.test", "-t", RCPT, "-M", "source.test", f"127.0.0.1:{port}"]
    started = time.monotonic()
    done = subprocess.run(cmd, env=postfix_env(), capture_output=True, text=True, timeout=900, check=False)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {done.stderr.strip()}")
    return messages / took


def provision(redis_url: str) -> None:
    import redis

    from fallback.mailbox import directory, passwords

    r = redis.Redis.from_url(redis_url)
    d = directory.Directory(r, directory.ensure_buckets(r, 65536))
    d.put(directory.Mailbox(RCPT, "default", passwords.hash_password("x", "SHA256-CRYPT")))
    r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, default=0,
                    help="messages per point (default: 2000 at 4 KiB, 1000 at 100 KiB)")
    ap.add_argument("--sizes", default="4KiB,100KiB")
    ap.add_argument("--concurrency", default="1,10,50")
    ap.add_argument("--trace-rounds", type=int, default=0, metavar="N",
                    help="issue 16: instead of the table, N interleaved rounds of the receiver with "
                         "the message trace on and off (--trace-retention 0), 4 KiB at 10 connections")
    ap.add_argument("--postfix-rounds", type=int, default=0, metavar="N",
                    help="issue 17: instead of the table, N interleaved rounds of the receiver, a "
                         "queue-only Postfix backup MX and the no-op aiosmtpd, 4 KiB, at 10 and 50 "
                         "connections (--concurrency), new and kept connections")
    ap.add_argument("--receiver-workers", type=int, default=1, metavar="N",
                    help="issue 17, with --postfix-rounds: also `fallback smtp --smtp-workers N`")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="issue 17: instead of the table, the durable receiver's and the no-op's "
                         "instructions per message over N messages, under callgrind "
                         "(bench/smtp_instructions.py; one --concurrency, default 10)")
    ap.add_argument("--keep", action="store_true",
                    help="with --instructions: kept connections instead of one per message")
    ap.add_argument("--trace-flush", type=int, default=0, metavar="N",
                    help="issue 16: N rounds of the trace's own CPU per event, in this process")
    args = ap.parse_args()
    if args.trace_flush:
        return trace_flush(args.trace_flush)
    if args.instructions:
        from bench.smtp_instructions import instructions

        sessions = 10 if args.concurrency == "1,10,50" else int(args.concurrency.split(",")[0])
        return instructions(args.instructions, sessions, args.keep)
    if args.postfix_rounds:
        from bench.versus_postfix import versus_postfix

        conns = ((10, 50) if args.concurrency == "1,10,50"
                 else tuple(int(c) for c in args.concurrency.split(",")))
        return versus_postfix(args.postfix_rounds, args.messages or 2000, conns, args.receiver_workers)
    if args.serve:
        kind, port = args.serve[0], int(args.serve[1])
        traced = {"trace-on": "14d", "trace-off": "0"}.get(kind)
        if kind == "noop":  # plain aiosmtpd on asyncio's own loop: the reference
            asyncio.run(serve_noop(port))
            return 0
        server = serve_durable(port, args.serve[2], args.serve[3],
                               store=kind in ("durable", "trace-on", "trace-off", "zstd", "off"),
                               trace_retention=traced,
                               compression=kind if kind in ("zstd", "off") else None)
        from fallback.config import load_settings
        from fallback.eventloop import run

        run(server, load_settings({}, env={}))  # the receiver's own loop, as `fallback smtp` runs it
        return 0
    if args.trace_rounds:
        return trace_cost(args.trace_rounds, args.messages or 2000,
                          int(args.concurrency.split(",")[0]) if args.concurrency != "1,10,50" else 10)

    work = Path(tempfile.mkdtemp(prefix="fallback-bench-smtp-"))
    redis_server = RedisServer(work / "redis").start()
    provision(redis_server.url)
    kinds = ("durable", "noop", "lean", "sink")
    ports = {kind: free_port() for kind in kinds}
    procs = {kind: start_server(kind, port, redis_server.url, work) for kind, port in ports.items()}
    print(f"redis-server {redis_server.url} (appendonly yes, appendfsync always) in {work}")
    print(f"{'size':>7} {'conns':>5} {'durable/s':>10} {'no-op/s':>9} {'lean/s':>9} {'sink/s':>9} "
          f"{'durable/no-op':>13} {'durable/lean':>12}")
    try:
        for size_name in args.sizes.split(","):
            size = SIZES[size_name]
            count = args.messages or (2000 if size <= 4096 else 1000)
            for sessions in (int(c) for c in args.concurrency.split(",")):
                n = max(count, sessions * 20)
                rates = {kind: drive(ports[kind], size, sessions, n) for kind in kinds}
                durable = rates["durable"]
                print(f"{size_name:>7} {sessions:>5} {durable:>10.0f} {rates['noop']:>9.0f} "
                      f"{rates['lean']:>9.0f} {rates['sink']:>9.0f} {durable / rates['noop']:>13.2f} "
                      f"{durable / rates['lean']:>12.2f}", flush=True)
        import redis

        r = redis.Redis.from_url(redis_server.url)
        print(f"stored: {r.zcard('mbx:{' + RCPT + '}:f:INBOX')} messages, "
              f"aof fsync policy {r.config_get('appendfsync')['appendfsync']}; "
              f"durable mail log: {len((work / 'durable-mail.log').read_bytes().splitlines())} lines")
        r.close()
    finally:
        for proc in procs.values():
            stop_pid(proc)
        redis_server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trace_cost(rounds: int, messages: int, sessions: int) -> int:
    """Issue 16: what the message trace costs at intake, as paired ratios of interleaved rounds
    (the machine may be busy with other work: each pair shares its moment), and the Redis
    bytes its records take per message (MEMORY USAGE of every trace key)."""
    import statistics

    import redis

    work = Path(tempfile.mkdtemp(prefix="fallback-bench-trace-"))
    redis_server = RedisServer(work / "redis").start()
    provision(redis_server.url)
    kinds = ("trace-on", "trace-off")
    ports = {kind: free_port() for kind in kinds}
    procs = {kind: start_server(kind, port, redis_server.url, work) for kind, port in ports.items()}
    print(f"{rounds} rounds of {messages} x 4 KiB at {sessions} connections, on then off "
          f"(odd rounds) or off then on (even); load average before: {os.getloadavg()[0]:.2f}")
    ratios = []
    # CPU seconds per kind: the receiver process's own, and redis-server's while that receiver
    # was driven (plus the settle time after each run, which holds its last trace flush).
    cpu = {kind: {"receiver": [], "redis": []} for kind in kinds}
    assert redis_server.proc is not None
    redis_pid = redis_server.proc.pid
    try:
        drive(ports["trace-on"], 4096, sessions, 200)  # warm both up
        drive(ports["trace-off"], 4096, sessions, 200)
        time.sleep(1.5)
        for n in range(rounds):
            order = kinds if n % 2 == 0 else kinds[::-1]
            rates = {}
            for kind in order:
                before = cpu_seconds(procs[kind].pid), cpu_seconds(redis_pid)
                rates[kind] = drive(ports[kind], 4096, sessions, messages)
                time.sleep(SETTLE)  # its last flush (every second) falls inside its own window
                cpu[kind]["receiver"].append(cpu_seconds(procs[kind].pid) - before[0])
                cpu[kind]["redis"].append(cpu_seconds(redis_pid) - before[1])
            ratios.append(rates["trace-on"] / rates["trace-off"])
            on_cpu = cpu["trace-on"]["receiver"][-1]
            off_cpu = cpu["trace-off"]["receiver"][-1]
            print(f"round {n + 1:>2}: on {rates['trace-on']:>6.0f}/s  off {rates['trace-off']:>6.0f}/s  "
                  f"on/off {ratios[-1]:.3f}  receiver CPU off/on {off_cpu / on_cpu:.3f}", flush=True)
        print(f"throughput on/off: median {statistics.median(ratios):.3f}, "
              f"mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
        for part in ("receiver", "redis"):
            per = {kind: sum(cpu[kind][part]) / (rounds * messages) * 1e6 for kind in kinds}
            pairs = [off / on for on, off in zip(cpu["trace-on"][part], cpu["trace-off"][part], strict=True)]
            print(f"{part} CPU per message: on {per['trace-on']:.0f} us, off {per['trace-off']:.0f} us "
                  f"(off/on {per['trace-off'] / per['trace-on']:.3f}; pairs median "
                  f"{statistics.median(pairs):.3f}, {min(pairs):.3f}-{max(pairs):.3f})")
        both = {kind: sum(cpu[kind]["receiver"]) + sum(cpu[kind]["redis"]) for kind in kinds}
        print(f"receiver + redis-server CPU off/on {both['trace-off'] / both['trace-on']:.3f}; "
              f"load average after: {os.getloadavg()[0]:.2f}")
        r = redis.Redis.from_url(redis_server.url)
        records = list(r.scan_iter(match="trace:{*", count=1000))
        index = list(r.scan_iter(match="trace:a:{*", count=1000))
        pipe = r.pipeline(transaction=False)
        for key in records + index:
            pipe.memory_usage(key, samples=0)
        sizes = pipe.execute()
        per_record = sum(sizes[:len(records)]) / max(1, len(records))
        lines = sum(int(r.llen(k)) for k in records[:200]) / max(1, min(200, len(records)))
        print(f"trace records: {len(records)} messages, {per_record:.0f} bytes each "
              f"({lines:.1f} lines); per-address index: {len(index)} keys, "
              f"{sum(sizes[len(records):])} bytes in all (capped at 1000 messages per address)")
        r.close()
    finally:
        for proc in procs.values():
            stop_pid(proc)
        redis_server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


async def _trace_round(url: str, traced: bool, events: int, per_flush: int) -> tuple[float, float]:
    """Thread CPU seconds of `events` intake events with their flushes, and redis-server's
    microseconds in EVAL (the trace's write) meanwhile."""
    from fallback.maillog import MailLog
    from fallback.ops import metrics
    from fallback.ops.trace import TraceBuffer
    from fallback.redisconn import async_client

    r = async_client(url)
    await r.config_resetstat()
    counters = metrics.Counters(1.0, trace=TraceBuffer(14 * 86400, "intake") if traced else None)
    mail = MailLog(counters=metrics.MailCounters(counters))
    started = time.thread_time()
    for i in range(events):  # the fields the receiver logs for one stored message
        mail.received(f"01JDXBENCH{i:016d}", "load@remote.test", RCPT, size=4437, peer="127.0.0.1",
                      took="0.004")
        if (i + 1) % per_flush == 0:
            await counters.flush_async(r)
    await counters.flush_async(r)
    took = time.thread_time() - started
    stats = await r.info("commandstats")
    await r.flushall()
    await r.aclose()
    return took, float(stats.get("cmdstat_eval", {}).get("usec", 0))


def trace_flush(rounds: int, events: int = 20_000, per_flush: int = 400) -> int:
    import logging
    import statistics

    logging.getLogger("fallback.mail").setLevel(logging.WARNING)  # as with the mail log in a file
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-trace-flush-"))
    redis_server = RedisServer(work / "redis").start()
    print(f"{rounds} rounds of {events} events, a flush every {per_flush}; "
          f"load average {os.getloadavg()[0]:.2f}")
    got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        for n in range(rounds):
            for traced in ((True, False) if n % 2 == 0 else (False, True)):
                got[traced].append(asyncio.run(_trace_round(redis_server.url, traced, events, per_flush)))
        costs = sorted((on[0] - off[0]) / events * 1e6 for on, off in zip(got[True], got[False], strict=True))
        on_us = statistics.median(x[0] for x in got[True]) / events * 1e6
        off_us = statistics.median(x[0] for x in got[False]) / events * 1e6
        redis_us = statistics.median(x[1] for x in got[True]) / events
        print(f"python CPU per event: trace on {on_us:.1f} us, off {off_us:.1f} us; the trace's "
              f"share per event (pairs): median {statistics.median(costs):.1f} us, "
              f"{costs[0]:.1f}-{costs[-1]:.1f}; redis-server in EVAL: {redis_us:.1f} us per event; "
              f"load average {os.getloadavg()[0]:.2f}")
    finally:
        redis_server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
