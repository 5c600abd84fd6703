"""Redis with Sentinel: one primary, replicas, and the 250 rule with replica acknowledgement.

Real parts only: redis-server primaries and replicas (`--replicaof`), real
`redis-server --sentinel` processes on free loopback ports, the real
receiver and smtplib.  The service is given nothing but the
`redis+sentinel://` URL; it finds the primary (and, after a failover, the
new one) through the Sentinels by itself.

With `replica_acks = 1` a 250 means that a replica holds the message too
(WAIT; WAITAOF on Redis 7.2+): a replica that cannot confirm in time makes
the write a 451, and a primary killed right after a 250 loses nothing,
because the replica Sentinel promotes already has it.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.cli import main
from fallback.config import Settings, load_settings
from fallback.mailbox import record
from fallback.mailbox.store import MailboxReader
from fallback.redisconn import sync_client
from tests.conftest import ReceiverThread, add_mailbox
from tests.servers import RedisSentinelServers, RedisServer, free_port, wait_for

RCPTS = ["alice@example.com", "bob@example.com", "carol@example.org"]
SENDER = "sender@remote.test"


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelServers]:
    """One primary, one replica, one Sentinel, shared by the tests that kill nothing."""
    servers = RedisSentinelServers(tmp_path_factory.mktemp("sentinel")).start()
    yield servers
    servers.stop()


@pytest.fixture
def primary(sentinel: RedisSentinelServers) -> Iterator[redis.Redis]:
    """A client of the primary itself (not through Sentinel), emptied for the test."""
    client = sentinel.client(sentinel.primary())
    client.flushall()
    client.execute_command("WAIT", len(sentinel.replicas()), 10_000)  # the replicas are empty too
    yield client
    client.close()


def make_settings(url: str, tmp_path: Path, **more: Any) -> Settings:
    return load_settings({"redis_url": url, "data_dir": str(tmp_path / "data"), "hostname": "fallback.test",
                          "smtp_port": 0, **more}, env={})


def message(token: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: someone@example.com\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@remote.test>\r\n\r\ntoken={token}\r\n"
            + "line of the body\r\n" * (1 + sum(map(ord, token)) % 30)).encode()


def transaction(smtp: smtplib.SMTP, rcpt: str, raw: bytes) -> tuple[int, str]:
    """MAIL, RCPT, DATA on an open session: (code, text) of whichever step refused, else of DATA."""
    code, text = smtp.mail(SENDER)
    if code == 250:
        code, text = smtp.rcpt(rcpt)
    if code != 250:
        smtp.rset()
        return code, text.decode()
    try:
        code, text = smtp.data(raw)
    except smtplib.SMTPDataError as exc:  # DATA itself refused
        error = exc.smtp_error
        return exc.smtp_code, error.decode() if isinstance(error, bytes) else error
    return code, text.decode()


def stored_id(text: str) -> str:
    m = re.search(r"id=(\S+)", text)
    assert m, text
    return m.group(1)


def held(r: redis.Redis, msg_id: str) -> bytes | None:
    """The stored bytes of `msg_id`, in whichever recipient's mailbox it is."""
    for addr in RCPTS:
        raw = record.read_raw(r, keys.message(addr, msg_id))
        if isinstance(raw, bytes):
            return raw
    return None


def without_trace(stored: bytes) -> bytes:
    """The message as the client sent it: our Received: line (with its folded lines) removed."""
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", stored)
    assert m, stored[:200]
    return stored[m.end():]


# 1. The whole path through a redis+sentinel:// URL --------------------------------------------


def test_provision_receive_export_through_sentinel(
        sentinel: RedisSentinelServers, primary: redis.Redis, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The operator lists every Sentinel; one of them is down, and the service uses the other.
    dead = free_port()
    url = sentinel.url.replace("://", f"://127.0.0.1:{dead},")
    csv = tmp_path / "users.csv"
    csv.write_text("address,password,mailstore\n" + "".join(f"{a},secret,store1\n" for a in RCPTS))
    assert main(["provision", str(csv), "--redis-url", url]) == 0
    assert main(["status", "--format", "json", "--redis-url", url]) == 0
    assert '"mailboxes": 3' in capsys.readouterr().out

    rt = ReceiverThread(make_settings(url, tmp_path)).start()
    try:
        raw = message("via-sentinel")
        with smtplib.SMTP("127.0.0.1", rt.port, timeout=10) as smtp:
            smtp.ehlo("client.remote.test")
            code, text = transaction(smtp, "alice@example.com", raw)
            assert code == 250, text
            with pytest.raises(smtplib.SMTPRecipientsRefused):  # RCPT still checks the directory
                smtp.sendmail(SENDER, ["nobody@example.com"], raw)
    finally:
        rt.stop()

    # It is on the primary Sentinel names, and `fallback export` reads it back byte for byte.
    assert MailboxReader(primary, "alice@example.com").raw(stored_id(text)) is not None
    out = tmp_path / "export"
    assert main(["export", "alice@example.com", "--format", "maildir", "--output", str(out),
                 "--redis-url", url]) == 0
    files = list(out.rglob("cur/*"))
    assert len(files) == 1
    assert without_trace(files[0].read_bytes()) == raw


# 2. replica_acks = 1: a replica that does not confirm means 451, not 250 --------------------------


def test_replica_acks_pause_and_resume(sentinel: RedisSentinelServers, primary: redis.Redis,
                                       tmp_path: Path) -> None:
    settings = make_settings(sentinel.url, tmp_path, replica_acks=1, replica_ack_timeout=0.5)
    for addr in RCPTS:
        add_mailbox(primary, settings, addr)
    replica_node = sentinel.replicas()[0]
    replica = sentinel.client(replica_node)
    rt = ReceiverThread(settings).start()
    accepted: dict[str, bytes] = {}      # msg id -> bytes sent, for every 250
    try:
        acks = rt.server.handler.replicas if rt.server is not None else None
        version = tuple(int(p) for p in str(primary.info("server")["redis_version"]).split(".")[:2])
        assert acks is not None and acks.command()[0] == ("WAITAOF" if version >= (7, 2) else "WAIT")

        with smtplib.SMTP("127.0.0.1", rt.port, timeout=10) as smtp:
            smtp.ehlo("client.remote.test")
            raw = message("replica-up")
            code, text = transaction(smtp, "alice@example.com", raw)
            assert code == 250, text
            accepted[stored_id(text)] = raw
            # 250 came after the replica confirmed: it holds the message already.
            copy = MailboxReader(replica, "alice@example.com").raw(stored_id(text))
            assert copy is not None and without_trace(copy) == raw

            assert replica_node.proc is not None
            os.kill(replica_node.proc.pid, signal.SIGSTOP)  # alive, connected, and silent
            try:
                for n in range(2):
                    code, text = transaction(smtp, "bob@example.com", message(f"replica-stopped-{n}"))
                    assert (code, text[:5]) == (451, "4.3.0"), (code, text)
                # The receiver keeps running: a new session is served as usual.
                with smtplib.SMTP("127.0.0.1", rt.port, timeout=10) as other:
                    assert other.ehlo("other.remote.test")[0] == 250
                    code, text = transaction(other, "carol@example.org", message("replica-stopped-other"))
                    assert (code, text[:5]) == (451, "4.3.0"), (code, text)
            finally:
                os.kill(replica_node.proc.pid, signal.SIGCONT)

            # The sender retries the deferred message on the same session: now it is a 250.
            raw = message("replica-stopped-0")
            for _ in range(20):
                code, text = transaction(smtp, "bob@example.com", raw)
                if code == 250:
                    break
                assert (code, text[:5]) == (451, "4.3.0"), (code, text)
                time.sleep(0.1)
            assert code == 250, text
            accepted[stored_id(text)] = raw
    finally:
        rt.stop()

    # Nothing that got 250 is missing, on the primary or on the replica.
    for msg_id, raw in accepted.items():
        for client in (primary, replica):
            copy = held(client, msg_id)
            assert copy is not None and without_trace(copy) == raw, msg_id
    replica.close()


# 3. Failover: the primary is SIGKILLed under load; Sentinel promotes a replica ------------------

CLIENTS = 4
PER_CLIENT = 25
KILL_AFTER = 20          # 250s before the primary is killed
DEADLINE = 60.0          # seconds for the whole run, failover included (a bound, not a check)


class Sender(threading.Thread):
    """Sends its messages in order; retries each after a 4xx, as an MTA would (sooner)."""

    def __init__(self, port: int, index: int, state: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.port, self.index, self.state = port, index, state
        self.accepted: dict[str, tuple[str, bytes, str]] = {}   # token -> (msg id, bytes, phase)
        self.refused: Counter[str] = Counter()                   # reply code (or "lost") -> times
        self.sent: dict[str, bytes] = {}

    def run(self) -> None:
        deadline = time.monotonic() + DEADLINE
        smtp: smtplib.SMTP | None = None
        for n in range(PER_CLIENT):
            token = f"fo-{self.index}-{n:03d}"
            rcpt = RCPTS[(self.index + n) % len(RCPTS)]
            raw = self.sent[token] = message(token)
            while time.monotonic() < deadline:
                try:
                    if smtp is None:
                        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
                        smtp.ehlo("load.remote.test")
                    code, text = transaction(smtp, rcpt, raw)
                except (smtplib.SMTPException, OSError):
                    self.refused["lost"] += 1
                    smtp = None
                    continue
                if code == 250:
                    self.accepted[token] = (stored_id(text), raw, self.state["phase"])
                    self.state["accepted"] += 1
                    break
                self.refused[str(code)] += 1
                time.sleep(0.05)
        if smtp is not None:
            smtp.quit()


def test_failover_loses_nothing_acknowledged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    servers = RedisSentinelServers(tmp_path / "sentinel", replicas=2).start()
    try:
        # Retries of one client address can pass the per-client message rate: not tested here.
        settings = make_settings(servers.url, tmp_path, replica_acks=1, replica_ack_timeout=0.5,
                                 max_messages_per_ip_per_minute=0)
        old = servers.primary()
        client = servers.client(old)
        for addr in RCPTS:
            add_mailbox(client, settings, addr)
        client.close()
        rt = ReceiverThread(settings).start()
        state: dict[str, Any] = {"phase": "before", "accepted": 0}
        senders = [Sender(rt.port, i, state) for i in range(CLIENTS)]
        try:
            for s in senders:
                s.start()
            wait_for(lambda: state["accepted"] >= KILL_AFTER, 30, f"{KILL_AFTER} messages accepted")
            old.kill()  # SIGKILL: the primary answers nothing more, ever
            state["phase"] = "switching"
            wait_for(lambda: servers.primary_port() != old.port, 30, "Sentinel to promote a replica")
            state["phase"] = "after"
            for s in senders:
                s.join(DEADLINE + 15)
            assert not any(s.is_alive() for s in senders)
        finally:
            rt.stop()

        accepted = {t: v for s in senders for t, v in s.accepted.items()}
        refused = sum((s.refused for s in senders), Counter())
        phases = Counter(phase for _, _, phase in accepted.values())
        with capsys.disabled():
            print(f"\nfailover: 250 by phase {dict(phases)}, refusals {dict(refused)}")
        # Every sender got every message through, the last ones from the new primary.
        assert len(accepted) == CLIENTS * PER_CLIENT
        assert phases["after"] > 0
        assert all(code == "lost" or code.startswith("4") for code in refused), refused
        assert refused["lost"] == 0  # the receiver answers 4xx; it never drops the session

        new = servers.primary()
        assert new is not old
        reader = sync_client(servers.url)  # Sentinel now names the promoted replica
        assert int(reader.info("server")["tcp_port"]) == new.port
        direct = servers.client(new)
        sent = {t: raw for s in senders for t, raw in s.sent.items()}
        for token, (msg_id, raw, _) in accepted.items():
            for c in (reader, direct):
                copy = held(c, msg_id)
                assert copy is not None, f"{token} ({msg_id}) got 250 but is not on the new primary"
                assert without_trace(copy) == raw, f"{token} differs"
        # A 451 may still have been stored (written, then not confirmed): a copy, never garbage.
        for addr in RCPTS:
            for _, _, stored in MailboxReader(direct, addr).iter_messages():
                found = re.search(rb"token=(fo-\d+-\d+)", stored)
                assert found is not None and without_trace(stored) == sent[found.group(1).decode()]
        reader.close()
        direct.close()
    finally:
        servers.stop()


# 4. A wrong Sentinel URL is one clear line, exit 1 ----------------------------------------------


@pytest.mark.parametrize(("where", "expected"), [
    ("nosuch", "no primary for Sentinel service 'nosuch': 127.0.0.1:{sentinel} does not monitor 'nosuch'"),
    ("dead", "no primary for Sentinel service 'fallback': no Sentinel answers at 127.0.0.1:{dead}"),
    ("noservice", "must name the Sentinel service"),
])
def test_bad_sentinel_url_is_one_line(sentinel: RedisSentinelServers, where: str, expected: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    port, dead = sentinel.sentinel_ports[0], free_port()
    url = {"nosuch": f"redis+sentinel://127.0.0.1:{port}/nosuch",
           "dead": f"redis+sentinel://127.0.0.1:{dead}/fallback",
           "noservice": f"redis+sentinel://127.0.0.1:{port}"}[where]
    assert main(["status", "--redis-url", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("fallback status: ")
    assert expected.format(sentinel=port, dead=dead) in err


def test_not_a_sentinel_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = RedisServer(tmp_path / "plain").start()
    try:
        assert main(["status", "--redis-url", f"redis+sentinel://127.0.0.1:{plain.port}/fallback"]) == 1
    finally:
        plain.stop()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fallback status: ") and "SENTINEL" in err, err
