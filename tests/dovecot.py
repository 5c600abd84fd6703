"""A private Dovecot for tests and benchmarks: generated config, free loopback port, stopped by PID.

Nothing of the system's Dovecot configuration is used: `dovecot -F -c CONF`
runs as a child process with its base_dir, state, logs and Maildirs under one
temporary directory.  Users live in a passwd-file (with an optional per-user
quota rule), the reconciler's master user in a second passdb with
`master = yes`.  Plain-text LOGIN is allowed only because Dovecot treats a
loopback connection (local address == remote address) as secured; nothing
listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port, stop_pid, wait_port

MASTER_USER = "reconciler"
MASTER_PASSWORD = "master-secret"


@dataclass
class DovecotServer:
    workdir: Path
    special_use: bool = True           # announce \Sent / \Trash (names below)
    sent_name: str = "Sent Items"
    trash_name: str = "Deleted Items"
    drafts_name: str = "Draft Items"   # \Drafts (issue 15)
    separator: str = "/"
    port: int = 0
    tls: tuple[Path, Path] | None = None   # (cert, key) PEM: serve imaps:// on `port` instead
    users: dict[str, str] = field(default_factory=dict)   # address -> quota rule ("" = none)
    capabilities: str = ""             # after login, announce only these (imap_capability); "": all
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'imaps' if self.tls else 'imap'}://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.workdir / "dovecot.conf"

    @property
    def maildirs(self) -> Path:
        return self.workdir / "mail"

    def _owner(self) -> tuple[str, int, int]:
        # Dovecot refuses to run mail processes as root; as root we borrow an
        # unprivileged system account and hand it the temporary directory.
        if os.getuid() != 0:
            entry = pwd.getpwuid(os.getuid())
            return entry.pw_name, entry.pw_uid, entry.pw_gid
        for name in ("dovecot", "nobody"):
            try:
                entry = pwd.getpwnam(name)
                return entry.pw_name, entry.pw_uid, entry.pw_gid
            except KeyError:
                continue
        raise RuntimeError("no unprivileged account to run Dovecot's mail processes")

    def write_users(self) -> None:
        _, uid, gid = self._owner()
        lines = []
        for address, quota in self.users.items():
            extra = f"userdb_quota_rule=*:storage={quota}" if quota else ""
            lines.append(f"{address}:{{PLAIN}}user-password:{uid}:{gid}::{self.maildirs}/{address}::{extra}")
        tmp = self.workdir / "users.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)
        tmp.replace(self.workdir / "users")   # Dovecot re-reads the file when it changes

    def add_users(self, addresses: list[str], quota: str = "") -> None:
        for a in addresses:
            self.users[a] = quota
        if self.proc is not None:
            self.write_users()

    def _config(self) -> str:
        name, uid, gid = self._owner()
        w = self.workdir
        su_sent = "special_use = \\Sent" if self.special_use else ""
        su_trash = "special_use = \\Trash" if self.special_use else ""
        su_drafts = "special_use = \\Drafts" if self.special_use else ""
        mailboxes = ""
        if self.special_use:
            mailboxes = f"""
  mailbox "{self.sent_name}" {{
    auto = subscribe
    {su_sent}
  }}
  mailbox "{self.trash_name}" {{
    auto = subscribe
    {su_trash}
  }}
  mailbox "{self.drafts_name}" {{
    auto = subscribe
    {su_drafts}
  }}"""
        ssl = "ssl = no"
        if self.tls:
            ssl = f"ssl = yes\nssl_cert = <{self.tls[0]}\nssl_key = <{self.tls[1]}"
        return f"""
base_dir = {w}/run
state_dir = {w}/state
log_path = {w}/dovecot.log
info_log_path = {w}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
# Plain text only where Dovecot sees a secured connection: loopback.
disable_plaintext_auth = yes
auth_failure_delay = 0
auth_mechanisms = plain login
auth_master_user_separator = *
default_login_user = {name}
default_internal_user = {name}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_plugins = quota
protocol imap {{
  mail_plugins = $mail_plugins imap_quota
  mail_max_userip_connections = 1000
}}
plugin {{
  quota = maildir:User quota
}}
namespace inbox {{
  inbox = yes
  separator = {self.separator}
  prefix ={mailboxes}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {w}/master-users
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {w}/users
}}
userdb {{
  driver = passwd-file
  args = {w}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {0 if self.tls else self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.port if self.tls else 0}
  }}
  process_min_avail = 1
  service_count = 0
}}
service imap {{
  process_limit = 1024
}}
service anvil {{
  chroot =
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
login_trusted_networks =
log_timestamp = "%Y-%m-%d %H:%M:%S "
{f"imap_capability = {self.capabilities}" if self.capabilities else ""}
"""

    def start(self) -> DovecotServer:
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not Path(binary).exists():
            raise RuntimeError("dovecot is not installed: run `make test`, which installs dovecot-imapd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        _, uid, gid = self._owner()
        for sub in ("run", "state", "mail"):
            (self.workdir / sub).mkdir(exist_ok=True)
        if os.getuid() == 0:
            # The borrowed account must reach its Maildirs and state.
            # (workdir comes from tempfile.mkdtemp, directly in the world-traversable temp dir:
            # pytest keeps its own tmp_path tree private to root.)
            os.chmod(self.workdir, 0o755)  # noqa: S103 - a throw-away test directory
            os.chown(self.maildirs, uid, gid)
            os.chown(self.workdir / "state", uid, gid)
        self.port = self.port or free_port()
        (self.workdir / "master-users").write_text(f"{MASTER_USER}:{{PLAIN}}{MASTER_PASSWORD}\n")
        os.chmod(self.workdir / "master-users", 0o644)
        self.write_users()
        self.conf.write_text(self._config())
        self.proc = subprocess.Popen([binary, "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(self.port, timeout=20)
        except TimeoutError:
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()
            self.stop()
            log = self.log_text()[-2000:]
            raise RuntimeError(f"dovecot did not start: {err.decode(errors='replace')} {log}") from None
        return self

    def log_text(self) -> str:
        path = self.workdir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            # Children exit once the master is gone; give them a moment to release the port.
            time.sleep(0.05)


class MainStoreView:
    """What a user's real mailbox holds, read as that user through the master login (stdlib imaplib)."""

    def __init__(self, server: DovecotServer, address: str) -> None:
        import imaplib

        self.imap = imaplib.IMAP4("127.0.0.1", server.port)
        self.imap.login(f"{address}*{MASTER_USER}", MASTER_PASSWORD)

    def folders(self) -> list[str]:
        _, lines = self.imap.list('""', "*")
        out = []
        for line in lines:
            text = line.decode() if isinstance(line, bytes) else str(line)
            name = text.rsplit(' "/" ', 1)[-1]
            out.append(name[1:-1].replace('\\"', '"').replace("\\\\", "\\") if name.startswith('"') else name)
        return out

    def messages(self, folder: str) -> list[dict[str, object]]:
        """uid, flags, internaldate and exact bytes of every message in `folder` (wire name)."""
        import imaplib

        quoted = '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
        typ, _ = self.imap.select(quoted, readonly=True)
        assert typ == "OK", folder
        typ, data = self.imap.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
        out = []
        for part in data:
            if not isinstance(part, tuple):
                continue
            head = part[0].decode()
            uid = int(head.split("UID ")[1].split()[0])
            flags = imaplib.ParseFlags(part[0])
            date = imaplib.Internaldate2tuple(part[0])
            out.append({"uid": uid, "flags": {f.decode() for f in flags}, "date": date, "raw": part[1]})
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.imap.logout()


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fallback-dovecot-"))


@pytest.fixture
def dovecot_factory() -> Iterator[Callable[..., DovecotServer]]:
    """Start private Dovecots (keyword arguments as DovecotServer's); stopped and removed afterwards."""
    started: list[DovecotServer] = []

    def make(users: list[str], **options: Any) -> DovecotServer:
        server = DovecotServer(new_workdir(), **options)
        server.users = {a: "" for a in users}
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def dovecot(dovecot_factory: Callable[..., DovecotServer], mailboxes: list[str]) -> DovecotServer:
    """A Dovecot that knows the `mailboxes` users, with SPECIAL-USE Sent Items / Deleted Items."""
    return dovecot_factory(mailboxes)
