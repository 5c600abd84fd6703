"""A private real Postfix for the tests and benchmarks: Debian's daemons, unpacked by
deploy/install-deps.sh into .tools/postfix (never installed), run as `master -d` from their
own config_directory and queue_directory on a free loopback port, stopped by PID.

What differs between uses (a perimeter relaying to the fallback, a queue-only backup MX) is
the main.cf text a caller adds; the directories, the services and the start/stop are here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.servers import POSTFIX_DIR, free_port, postfix_env, stop_pid, wait_port

MASTER = POSTFIX_DIR / "usr" / "lib" / "postfix" / "sbin" / "master"
SERVICES = """\
{port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""
QUEUE_DIRS = ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
              "maildrop", "private", "public", "saved", "trace")


def available() -> bool:
    """Postfix is unpacked and we may run it (its daemons drop to `daemon`: needs root)."""
    return MASTER.exists() and os.geteuid() == 0


class PrivatePostfix:
    """A Postfix master in the foreground under `base`, configured by `main_cf` (added after
    the paths and identity every private instance needs)."""

    def __init__(self, base: Path, hostname: str, main_cf: str, before: str = "") -> None:
        self.base = base
        self.conf, self.queue, self.data = base / "etc", base / "queue", base / "data"
        self.port = free_port()
        self.log = base / "postfix.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.conf, self.queue / "pid", self.data):
            d.mkdir(parents=True, exist_ok=True)  # a caller may have put a table in etc/ first
        for name in QUEUE_DIRS:
            (self.queue / name).mkdir()
        subprocess.run(["chown", "-R", "daemon", str(self.data), *(str(self.queue / n) for n in QUEUE_DIRS)],
                       check=True, timeout=30)
        tools = POSTFIX_DIR / "usr"
        (self.conf / "main.cf").write_text(
            f"{before}"
            "compatibility_level = 3.6\n"
            f"queue_directory = {self.queue}\ndata_directory = {self.data}\n"
            f"daemon_directory = {tools / 'lib' / 'postfix' / 'sbin'}\n"
            f"command_directory = {tools / 'sbin'}\nshlib_directory = {tools / 'lib' / 'postfix'}\n"
            f"meta_directory = {POSTFIX_DIR / 'etc' / 'postfix'}\n"
            "mail_owner = daemon\nsetgid_group = mail\n"
            "import_environment = MAIL_CONFIG MAIL_DEBUG TZ LANG=C LD_LIBRARY_PATH\n"
            f"maillog_file = {self.log}\nmaillog_file_prefixes = {base}\n"
            "inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
            f"myhostname = {hostname}\nmydestination =\nlocal_recipient_maps =\nalias_maps =\n"
            f"{main_cf}")
        (self.conf / "master.cf").write_text(SERVICES.format(port=f"127.0.0.1:{self.port}"))

    @property
    def env(self) -> dict[str, str]:
        return {**postfix_env(), "MAIL_CONFIG": str(self.conf)}

    def start(self) -> PrivatePostfix:
        self.proc = subprocess.Popen([str(MASTER), "-c", str(self.conf), "-d"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, timeout=30)
        except Exception:
            self.stop()
            raise RuntimeError(f"postfix did not start: {self.log_text()}") from None
        return self

    def restart_with(self, line: str) -> None:
        """One more main.cf line, with a fresh master (a reload would let an old smtpd take
        the next connection with the old settings)."""
        self.stop()
        with open(self.conf / "main.cf", "a") as f:
            f.write(line + "\n")
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def queued(self) -> int:
        """Messages in Postfix's queue (any state)."""
        return sum(1 for name in ("incoming", "active", "deferred", "hold")
                   for _, _, files in os.walk(self.queue / name) for _ in files)

    def empty_queue(self) -> None:
        """Every queued message deleted (postsuper -d ALL)."""
        subprocess.run([str(POSTFIX_DIR / "usr" / "sbin" / "postsuper"), "-c", str(self.conf), "-d", "ALL"],
                       env=self.env, capture_output=True, timeout=120, check=False)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
