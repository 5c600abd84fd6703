"""A private OpenLDAP slapd for tests: generated slapd.conf, LDIF of users, free port, stopped by PID.

Nothing of the system's slapd configuration is used (Debian's package is
installed for the binary and its schemas only; no system service runs).  The
database (mdb) is filled offline with `slapadd` before slapd starts, so a
directory of thousands of users is ready at once.  The size limit is the
default 500 entries per search, with paging unlimited (`size.prtotal`): a
search that does not page gets sizeLimitExceeded past 500 users, which is how
the tests know the importer really pages.

userPassword may be read only by READER_DN (and compared for binds by
anyone), as providers usually set it: an anonymous search sees users without
their hashes.

With `tls` (a certificate and its key, PEM) slapd listens on ldaps:// only.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import free_port, stop_pid, wait_port

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
SCHEMA = Path("/etc/ldap/schema")
BASE_DN = "dc=example,dc=com"
PEOPLE_DN = f"ou=people,{BASE_DN}"
READER_DN = f"cn=reader,{BASE_DN}"
READER_PASSWORD = "reader-secret"
SIZE_LIMIT = 500


def ssha(password: str, salt: bytes = b"fixture-salt") -> str:
    """`{SSHA}` as slapd's own `slappasswd` writes it (SHA-1 of password + salt, then the salt)."""
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


@dataclass
class LdapUser:
    uid: str
    mail: str
    password: str | None            # the userPassword value exactly as stored (None: no attribute)
    aliases: list[str] = field(default_factory=list)   # mailLocalAddress values
    mailhost: str = ""              # mailHost: the user's mailstore in the tests' mapping
    extra_classes: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)      # more "attribute: value" lines

    def ldif(self) -> str:
        lines = [f"dn: uid={self.uid},{PEOPLE_DN}", "objectClass: inetOrgPerson",
                 "objectClass: inetLocalMailRecipient",
                 *(f"objectClass: {c}" for c in self.extra_classes),
                 f"uid: {self.uid}", f"cn: {self.uid}", f"sn: {self.uid}", f"mail: {self.mail}"]
        if self.password is not None:
            # base64 (`::`) so any hash character ($, {, trailing spaces) survives LDIF as is.
            lines.append("userPassword:: " + base64.b64encode(self.password.encode()).decode())
        lines += [f"mailLocalAddress: {a}" for a in self.aliases]
        if self.mailhost:
            lines.append(f"mailHost: {self.mailhost}")
        lines += self.extra
        return "\n".join(lines) + "\n"


@dataclass
class SlapdServer:
    workdir: Path
    users: list[LdapUser]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    tls: tuple[Path, Path] | None = None    # (certificate, key): serve ldaps:// instead

    @property
    def url(self) -> str:
        return f"{'ldaps' if self.tls else 'ldap'}://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.workdir / "slapd.conf"

    def _config(self) -> str:
        w = self.workdir
        schemas = "\n".join(f"include {SCHEMA / name}.schema"
                            for name in ("core", "cosine", "inetorgperson", "misc"))
        # mailAlternateAddress (Sun's and qmail's schemas, not Debian's; a test OID here):
        # addresses that receive the user's mail, as many providers' directories hold them.
        (w / "extra.schema").write_text(
            "attributetype ( 1.3.6.1.4.1.99999.1.1 NAME 'mailAlternateAddress' "
            "EQUALITY caseIgnoreIA5Match SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 )\n"
            # and an outside address to reach the user at (a provider's own attribute)
            "attributetype ( 1.3.6.1.4.1.99999.1.2 NAME 'contactMail' "
            "EQUALITY caseIgnoreIA5Match SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 )\n")
        schemas += f"\ninclude {w / 'extra.schema'}"
        tls = ("" if self.tls is None
               else f"TLSCertificateFile {self.tls[0]}\nTLSCertificateKeyFile {self.tls[1]}\n")
        return f"""{schemas}
{tls}pidfile {w}/slapd.pid
argsfile {w}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit size.soft={SIZE_LIMIT} size.hard={SIZE_LIMIT} size.prtotal=unlimited
database mdb
maxsize 268435456
suffix "{BASE_DN}"
rootdn "cn=admin,{BASE_DN}"
rootpw admin-secret
directory {w}/db
access to attrs=userPassword
  by dn.exact="{READER_DN}" read
  by anonymous auth
  by * none
access to * by * read
"""

    def _ldif(self) -> str:
        head = (f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\n"
                "dc: example\no: Example\n\n"
                f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n\n"
                f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
                f"cn: reader\nuserPassword: {ssha(READER_PASSWORD)}\n\n")
        return head + "\n".join(u.ldif() for u in self.users)

    def start(self) -> SlapdServer:
        if not SLAPD.exists():
            raise RuntimeError("slapd is not installed: run `make test`, which installs slapd")
        (self.workdir / "db").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        ldif = self.workdir / "users.ldif"
        ldif.write_text(self._ldif())
        # -q: no consistency checks, the bulk-load mode meant for a fresh database.
        done = subprocess.run([str(SLAPADD), "-q", "-f", str(self.conf), "-l", str(ldif)],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"slapadd failed: {done.stderr[-2000:]}")
        self.port = self.port or free_port()
        # -d 0: stay in the foreground (stopped by PID), without debug output.
        self.proc = subprocess.Popen([str(SLAPD), "-f", str(self.conf), "-h", f"{self.url}/", "-d", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(self.port, timeout=20)
        except TimeoutError:
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()
            self.stop()
            raise RuntimeError(f"slapd did not start: {err.decode(errors='replace')[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None


@pytest.fixture
def slapd_factory() -> Iterator[Callable[..., SlapdServer]]:
    """Start private slapds serving the given users under PEOPLE_DN (on ldaps:// with `tls`);
    stopped and removed afterwards."""
    started: list[SlapdServer] = []

    def make(users: list[LdapUser], tls: tuple[Path, Path] | None = None) -> SlapdServer:
        server = SlapdServer(Path(tempfile.mkdtemp(prefix="fallback-slapd-")), users, tls=tls)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
