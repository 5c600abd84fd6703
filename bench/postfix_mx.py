"""A real Postfix set up as a queue-only backup MX, for bench/smtp_ingest.py's comparison.

Debian's postfix daemons, unpacked by deploy/install-deps.sh into .tools/postfix (never
installed), run as `master -d` from a private config_directory and queue_directory on a
free loopback port, started and stopped by PID, as in tests/test_postfix_relay.py (whose
master.cf services and queue directories are reused).  The test domain is a relay domain
and every relayed message is deferred (`defer_transports = smtp relay`): what a backup MX
does while the primary is down, its 250 given, as Postfix always does, only after the
cleanup daemon has fsynced the queue file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.servers import POSTFIX_DIR, free_port, postfix_env, stop_pid, wait_port
from tests.test_postfix_relay import QUEUE_DIRS, SERVICES

__all__ = ["BackupMX", "available"]

MASTER = POSTFIX_DIR / "usr" / "lib" / "postfix" / "sbin" / "master"


def available() -> bool:
    return MASTER.exists()


class BackupMX:
    """Postfix accepting mail for `domain`, queueing it durably, delivering none of it."""

    def __init__(self, domain: str) -> None:
        # Not under a root-private dir: Postfix's daemons run as `daemon`.
        self.base = Path(tempfile.mkdtemp(prefix="fallback-bench-postfix-"))
        self.base.chmod(0o755)
        self.conf, self.queue, self.data = self.base / "etc", self.base / "queue", self.base / "data"
        self.port = free_port()
        self.log = self.base / "postfix.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.conf, self.queue / "pid", self.data):
            d.mkdir(parents=True)
        for name in QUEUE_DIRS:
            (self.queue / name).mkdir()
        subprocess.run(["chown", "-R", "daemon", str(self.data), *(str(self.queue / n) for n in QUEUE_DIRS)],
                       check=True, timeout=30)
        tools = POSTFIX_DIR / "usr"
        (self.conf / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            f"queue_directory = {self.queue}\ndata_directory = {self.data}\n"
            f"daemon_directory = {tools / 'lib' / 'postfix' / 'sbin'}\n"
            f"command_directory = {tools / 'sbin'}\nshlib_directory = {tools / 'lib' / 'postfix'}\n"
            f"meta_directory = {POSTFIX_DIR / 'etc' / 'postfix'}\n"
            "mail_owner = daemon\nsetgid_group = mail\n"
            "import_environment = MAIL_CONFIG MAIL_DEBUG TZ LANG=C LD_LIBRARY_PATH\n"
            f"maillog_file = {self.log}\nmaillog_file_prefixes = {self.base}\n"
            "inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
            "myhostname = backup-mx.test\nmydestination =\nlocal_recipient_maps =\nalias_maps =\n"
            f"relay_domains = {domain}\nmynetworks = 127.0.0.0/8\n"
            # A backup MX: take the mail for the relay domain, queue it, hold it (primary down).
            "defer_transports = smtp relay\n"
            "smtp_dns_support_level = disabled\nsmtpd_peername_lookup = no\n"
            "queue_run_delay = 300s\n")
        (self.conf / "master.cf").write_text(SERVICES.format(port=f"127.0.0.1:{self.port}"))

    def start(self) -> BackupMX:
        env = {**postfix_env(), "MAIL_CONFIG": str(self.conf)}
        self.proc = subprocess.Popen([str(MASTER), "-c", str(self.conf), "-d"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, timeout=30)
        except Exception:
            self.stop()
            raise RuntimeError(f"postfix did not start: {self.log_text()}") from None
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def queued(self) -> int:
        """Messages in the queue (any state)."""
        return sum(1 for name in ("incoming", "active", "deferred", "hold")
                   for _ in (self.queue / name).rglob("*") if _.is_file())

    def empty_queue(self) -> None:
        """Between rounds, outside the timing: every round starts with the same queue."""
        subprocess.run([str(POSTFIX_DIR / "usr" / "sbin" / "postsuper"), "-c", str(self.conf), "-d", "ALL"],
                       env={**postfix_env(), "MAIL_CONFIG": str(self.conf)}, capture_output=True,
                       timeout=120, check=False)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
