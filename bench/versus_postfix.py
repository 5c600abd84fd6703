"""Issue 17: the durable receiver against a queue-only Postfix backup MX and a no-op aiosmtpd.

`bench/smtp_ingest.py --postfix-rounds N` runs this: the three servers are started once,
and each round drives them one after the other (the order rotating every round, so that
no target always runs right after another one's load), with Postfix's `smtp-source`
sending 4 KiB messages, at each concurrency both with one new connection per message
(no `-d`: greeting, EHLO, MAIL, RCPT, DATA, QUIT each time) and with kept connections (`-d`).
The machine may be shared with other work: every ratio is taken within a round, then the
median and the spread (min-max) of the rounds are printed.  On a busy machine a server of
many processes (Postfix: an smtpd per connection, cleanup, qmgr, ...) gets a larger share
of the CPUs than one of a single process, so the CPU time each target spends per message
(every process of it: the receiver with its redis-server, Postfix's whole process tree
with the children it reaped) is printed too, and its ratio: what the same machine, idle,
would give.

- receiver: the SMTP part of `fallback up` (bench/smtp_ingest.py `--serve durable`), storing
  into redis-server with `appendfsync always`, its per-IP connection cap raised to 1000 for
  the single-source load and its per-IP message rate off;
- postfix: bench/postfix_mx.py's backup MX (queue files fsynced before 250);
- no-op: plain aiosmtpd whose handle_DATA answers 250 and stores nothing;
- with `--receiver-workers N` also receiver-xN: `fallback smtp --smtp-workers N` (N receiver
  processes on one port, SO_REUSEPORT), the same settings, on the same redis-server.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.postfix_mx import BackupMX, available
from bench.smtp_ingest import RCPT, drive, provision, start_server
from tests.servers import ROOT, RedisServer, free_port, stop_pid, wait_port

__all__ = ["versus_postfix"]

SIZE = 4 * 1024
TARGETS = ("receiver", "postfix", "noop")


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants and the children they reaped."""
    total, stack = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:  # gone meanwhile: its parent's reaped-children time holds it
            continue
        total += sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
        stack.extend(int(c) for c in children)
    return total


def _spread(xs: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def _workers(port: int, redis_url: str, workers: int, work: Path) -> subprocess.Popen[bytes]:
    """`fallback smtp --smtp-workers N` with the settings of `--serve durable`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FALLBACK_LOG_LEVEL="WARNING",
               FALLBACK_MAX_CONNECTIONS_PER_IP="1000", FALLBACK_MAX_COMMANDS="1000000",
               FALLBACK_MAX_MESSAGES_PER_IP_PER_MINUTE="0", FALLBACK_MAIL_LOG=str(work / "workers-mail.log"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fallback", "smtp", "--redis-url", redis_url, "--smtp-port", str(port),
         "--smtp-workers", str(workers), "--hostname", "bench.test"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def versus_postfix(rounds: int, messages: int, conns: tuple[int, ...], workers: int = 1) -> int:
    if not available():
        print("versus_postfix: Postfix missing: run deploy/install-deps.sh test")
        return 2
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-mx-"))
    redis_server = RedisServer(work / "redis").start()
    provision(redis_server.url)
    mx = BackupMX(RCPT.rpartition("@")[2])
    procs = {}
    try:
        mx.start()
        ports = {"postfix": mx.port, "receiver": free_port(), "noop": free_port()}
        procs["receiver"] = start_server("durable", ports["receiver"], redis_server.url, work)
        procs["noop"] = start_server("noop", ports["noop"])
        assert mx.proc is not None and redis_server.proc is not None
        pids = {"receiver": (procs["receiver"].pid, redis_server.proc.pid),
                "postfix": (mx.proc.pid,), "noop": (procs["noop"].pid,)}
        targets: tuple[str, ...] = TARGETS
        if workers > 1:
            many = f"receiver-x{workers}"
            ports[many] = free_port()
            procs[many] = _workers(ports[many], redis_server.url, workers, work)
            pids[many] = (procs[many].pid, redis_server.proc.pid)
            targets = (*TARGETS, many)

        def used(target: str) -> float:
            return sum(_tree_cpu(pid) for pid in pids[target])

        print(f"{rounds} rounds of {messages} x 4 KiB per target; receiver into redis-server "
              "(appendonly yes, appendfsync always); postfix queue-only backup MX (fsync before 250)")
        for target in targets:  # warm-up: imports, the directory cache, Postfix's daemons
            drive(ports[target], SIZE, 10, 200, keep=False)
        for sessions in conns:
            for keep in (False, True):
                how = "kept connections (-d)" if keep else "new connection per message"
                print(f"\n{sessions} connections, {how}")
                rates: dict[str, list[float]] = {t: [] for t in targets}
                cpu: dict[str, list[float]] = {t: [] for t in targets}
                alone: list[float] = []  # the receiver's own process, without its redis-server
                for n in range(rounds):
                    order = targets[n % len(targets):] + targets[:n % len(targets)]
                    for target in order:
                        mx.empty_queue()
                        before, own = used(target), _tree_cpu(pids[target][0])
                        rates[target].append(drive(ports[target], SIZE, sessions, messages, keep=keep))
                        cpu[target].append((used(target) - before) / messages * 1e6)
                        if target == "receiver":
                            alone.append((_tree_cpu(pids[target][0]) - own) / messages * 1e6)
                    print(f"  round {n + 1:>2}: " + "  ".join(f"{t} {rates[t][-1]:6.0f}/s" for t in targets),
                          flush=True)
                for t in targets:
                    print(f"  {t:>8}: {_spread(rates[t], '.0f')} msg/s, "
                          f"{_spread(cpu[t], '.0f')} us CPU/msg (median, min-max)")
                print(f"  receiver process alone (its redis-server not counted): "
                      f"{_spread(alone, '.0f')} us CPU/msg, "
                      f"no-op/it {_spread([b / a for a, b in zip(alone, cpu['noop'], strict=True)])}")
                for mine in ("receiver", *targets[3:]):
                    for other in ("postfix", "noop"):
                        tput = [a / b for a, b in zip(rates[mine], rates[other], strict=True)]
                        eff = [b / a for a, b in zip(cpu[mine], cpu[other], strict=True)]
                        print(f"  {mine}/{other}: throughput {_spread(tput)}, "
                              f"by CPU per message {_spread(eff)}")
    finally:
        for proc in procs.values():
            stop_pid(proc)
        mx.cleanup()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0
