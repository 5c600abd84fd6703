"""A real Postfix set up as a queue-only backup MX, for bench/smtp_ingest.py's comparison.

Debian's postfix daemons, unpacked by deploy/install-deps.sh into .tools/postfix (never
installed), run as `master -d` from a private config_directory and queue_directory on a
free loopback port, started and stopped by PID: tests/postfix.py's PrivatePostfix, which
tests/test_postfix_relay.py uses too, with a backup MX's main.cf.  The test domain is a relay domain
and every relayed message is deferred (`defer_transports = smtp relay`): what a backup MX
does while the primary is down, its 250 given, as Postfix always does, only after the
cleanup daemon has fsynced the queue file.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.postfix import PrivatePostfix, available

__all__ = ["BackupMX", "available"]


class BackupMX(PrivatePostfix):
    """Postfix accepting mail for `domain`, queueing it durably, delivering none of it."""

    def __init__(self, domain: str) -> None:
        # Not under a root-private dir: Postfix's daemons run as `daemon`.
        base = Path(tempfile.mkdtemp(prefix="fallback-bench-postfix-"))
        base.chmod(0o755)
        super().__init__(base, "backup-mx.test", (
            f"relay_domains = {domain}\nmynetworks = 127.0.0.0/8\n"
            # A backup MX: take the mail for the relay domain, queue it, hold it (primary down).
            "defer_transports = smtp relay\n"
            "smtp_dns_support_level = disabled\nsmtpd_peername_lookup = no\n"
            "queue_run_delay = 300s\n"))

    def start(self) -> BackupMX:
        super().start()
        return self

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
