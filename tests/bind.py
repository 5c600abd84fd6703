"""A private BIND for the DNS switch tests: `named -g -c CONF` on a free loopback port, stopped by PID.

The zone is a copy of deploy/dns/example.zone (so the example the operators
read is one the tests load), primary, updatable only with the generated TSIG
key and only for MX records, as the example's comment recommends.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import dns.rrset

from tests.servers import ROOT, free_port, stop_pid

ZONE = "example.com"
KEY_NAME = "fallback-dns"


@dataclass
class BindServer:
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    secret: str = ""

    @property
    def key_file(self) -> Path:
        return self.workdir / "fallback-dns.key"

    def start(self) -> BindServer:
        named = shutil.which("named") or "/usr/sbin/named"
        if not Path(named).exists():
            raise RuntimeError("named is not installed: run `make test` (deploy/install-deps.sh test)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.secret = base64.b64encode(secrets.token_bytes(32)).decode()
        key = f'key "{KEY_NAME}" {{\n\talgorithm hmac-sha256;\n\tsecret "{self.secret}";\n}};\n'
        self.key_file.write_text(key)
        shutil.copy(ROOT / "deploy" / "dns" / "example.zone", self.workdir / "example.com.zone")
        w = self.workdir
        conf = w / "named.conf"
        conf.write_text(f"""
include "{self.key_file}";
options {{
    directory "{w}";
    pid-file "{w}/named.pid";
    session-keyfile "{w}/session.key";
    managed-keys-directory "{w}";
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-transfer {{ none; }};
}};
controls {{ }};
logging {{ channel f {{ file "{w}/named.log"; severity info; }}; category default {{ f; }}; }};
zone "{ZONE}" {{
    type primary;
    file "{w}/example.com.zone";
    update-policy {{ grant {KEY_NAME} name {ZONE}. MX; }};
}};
""")
        self.proc = subprocess.Popen([named, "-g", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=(w / "named.stderr").open("wb"))
        deadline = time.monotonic() + 30
        while True:
            try:
                self.mx()
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"named did not start; see {w}/named.stderr") from None
                time.sleep(0.1)

    def mx(self) -> dns.rrset.RRset | None:
        """The apex MX RRset as the server answers it (plain TCP query, no key)."""
        q = dns.message.make_query(ZONE + ".", dns.rdatatype.MX)
        response = dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=5)
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.MX:
                return rrset
        return None

    def serial(self) -> int:
        q = dns.message.make_query(ZONE + ".", dns.rdatatype.SOA)
        response = dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=5)
        return int(response.answer[0][0].serial)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
