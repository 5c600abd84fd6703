"""Issue 17: the receiver's work per message counted in instructions, which other load on the
machine does not change, beside the no-op aiosmtpd's in the same run.

Messages per second on this 2-core machine move by ±30 % from round to round with whatever
else runs; the instructions a process executes for the same messages move by a few per cent.
Each server (`smtp_ingest.py --serve KIND`: the durable receiver as `fallback up` runs it,
storing into redis-server with `appendfsync always`, and plain aiosmtpd answering 250) runs
under valgrind's callgrind.  Postfix's `smtp-source` sends a warm-up of 100 messages, the
counters are zeroed (`callgrind_control -z`), then `--messages` more, 4 KiB, with one new
connection per message (or kept ones with `--keep`), and the counts are dumped.  Printed: the
million instructions per message of each and the no-op/durable ratio: above 1.0 the receiver
does less work per message than the no-op.

Counted: the server process's own user-space instructions: its Python, the interpreter, uvloop
and the C libraries.  Not counted: the kernel (accept, the replies' writes, epoll: about a third
of the receiver's CPU, the same per message for both), nor redis-server's work for the durable
receiver.  Under valgrind each server runs some 50 times slower, so the load is small and few
messages share a group-committed write: the durable figure is the one of a lightly loaded
receiver, not of one at its limit.

    .venv/bin/python bench/smtp_ingest.py --instructions 300 [--concurrency 10] [--keep]
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.smtp_ingest import provision
from tests.servers import RedisServer, free_port, postfix_env, postfix_tool, stop_pid, wait_port

WARM_UP = 100
KINDS = ("durable", "noop")
_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def _load(port: int, sessions: int, messages: int, keep: bool) -> None:
    cmd = [*postfix_tool("smtp-source"), *(["-d"] if keep else []), "-s", str(sessions),
           "-m", str(messages), "-l", "4096", "-f", "load@remote.test", "-t", "bench@example.com",
           "-M", "source.test", f"127.0.0.1:{port}"]
    subprocess.run(cmd, env=postfix_env(), capture_output=True, timeout=1800, check=True)


def _counted(kind: str, redis_url: str, work: Path, sessions: int, messages: int,
             keep: bool) -> float:
    """Instructions per message of one server kind, measured as the module docstring says."""
    port = free_port()
    out = work / f"{kind}.callgrind"
    script = Path(__file__).with_name("smtp_ingest.py")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", sys.executable, str(script),
         "--serve", kind, str(port), redis_url, str(work / f"{kind}-mail.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=300)  # Python's start-up under valgrind takes tens of seconds
        _load(port, sessions, WARM_UP, keep)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        _load(port, sessions, messages, keep)
        subprocess.run(["callgrind_control", "-d", "measured", str(proc.pid)], capture_output=True,
                       check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dumps = sorted(work.glob(f"{kind}.callgrind.{proc.pid}.*"))
            found = _TOTAL.search(dumps[-1].read_text()) if dumps else None
            if found:
                return int(found.group(1)) / messages
            time.sleep(0.5)
        raise RuntimeError(f"callgrind wrote no counts for {kind} within a minute")
    finally:
        stop_pid(proc)


def instructions(messages: int, sessions: int, keep: bool) -> int:
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"smtp_instructions: needs {' and '.join(missing)} (Debian's valgrind: "
              "deploy/install-deps.sh bench installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fallback-bench-instructions-"))
    redis_server = RedisServer(work / "redis").start()
    try:
        provision(redis_server.url)
        counts = {kind: _counted(kind, redis_server.url, work, sessions, messages, keep) for kind in KINDS}
    finally:
        redis_server.stop()
    how = "kept connections" if keep else "a new connection per message"
    print(f"{messages} messages of 4 KiB, {sessions} connections, {how}; user-space instructions "
          "of the server process (kernel and redis-server not counted)")
    for kind in KINDS:
        print(f"  {kind:8} {counts[kind] / 1e6:7.3f} M instructions per message")
    print(f"  no-op/durable {counts['noop'] / counts['durable']:.2f}")
    return 0
