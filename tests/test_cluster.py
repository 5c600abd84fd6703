"""The product on a real Redis Cluster: 3 primaries with a replica each, started by a fixture.

End to end (provision, SMTP intake across slots, webmail read and send,
outbound, reconcile into Dovecot, status), the cluster-only write rule (one
atomic write per slot, a retry after a partial write stored once), and a
primary killed mid-run with its replica promoted: every message that got 250
survives.  The rest of the suite runs on a cluster too with
FALLBACK_TEST_REDIS=cluster (`make test-cluster`).
"""

from __future__ import annotations

import json
import random
import re
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from fallback import keys
from fallback.cli import main
from fallback.config import load_settings
from fallback.mailbox import fields, record, store
from fallback.ops import metrics
from fallback.redisconn import sync_client
from tests.conftest import ReceiverThread, add_mailbox, cached_hash
from tests.dovecot import MainStoreView
from tests.reconcile_helpers import cli_args, reconcile_settings
from tests.servers import RedisClusterServers, SmtpSink, wait_for
from tests.test_outbound import WorkerThread
from tests.webutil import log_in_as, make_app


def _spread(per_primary: int = 4) -> list[str]:
    """Users whose mailboxes fall in each third of the slots (what `redis-cli --cluster create`
    gives each of 3 primaries), so every test touches every node."""
    thirds: dict[int, list[str]] = {0: [], 1: [], 2: []}
    n = 0
    while any(len(v) < per_primary for v in thirds.values()):
        address = f"user{n}@example.com"
        third = thirds[min(2, key_slot(keys.mbx(address).encode()) * 3 // 16384)]
        if len(third) < per_primary:
            third.append(address)
        n += 1
    return [a for i in range(per_primary) for a in (thirds[0][i], thirds[1][i], thirds[2][i])]


USERS = _spread()
SENDER = "someone@remote.test"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    c = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def redis_url(cluster: RedisClusterServers) -> str:
    """Every fixture of this module (r, settings, receiver_factory...) talks to the cluster."""
    return cluster.url


def provision(r: redis.Redis, settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "users.csv"
    csv.write_text("address,password,mailstore\n" + "".join(
        f"{a},{cached_hash('secret', 'SHA512-CRYPT')},store{n % 2}\n"
        for n, a in enumerate(USERS)))
    rc = main(["provision", str(csv), "--redis-url", settings.redis_url])
    assert rc == 0, capsys.readouterr().err


def copies(r: redis.Redis, address: str, body: bytes) -> list[bytes]:
    ids = r.zrange(keys.folder(address, fields.INBOX), 0, -1)
    raws = [record.read_raw(r, keys.message(address, i.decode())) for i in ids]  # type: ignore[union-attr]
    return [x for x in raws if isinstance(x, bytes) and x.endswith(body)]


def test_provisioned_users_spread_over_every_primary(cluster: RedisClusterServers, r: redis.Redis,
                                                     settings: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, tmp_path, capsys)
    owners = {cluster.primary_of(keys.mbx(a)).port for a in USERS}
    assert len(owners) == 3, "the test users must live on every primary"
    sizes = {}
    for node in cluster.alive():
        c = cluster.client(node)
        if c.info("replication")["role"] == "master":
            sizes[node.port] = c.dbsize()
        c.close()
    assert len(sizes) == 3 and all(n > 0 for n in sizes.values()), sizes  # the directory is spread too
    capsys.readouterr()
    assert main(["affected", "--format", "json", "--redis-url", settings.redis_url]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(row["address"] for row in listed) == sorted(USERS)


def test_one_message_for_recipients_on_every_node(r: redis.Redis, settings: Any, tmp_path: Path,
                                                  receiver_factory: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, tmp_path, capsys)
    rt = receiver_factory()
    body = b"Subject: to everyone\r\nMessage-ID: <all@remote.test>\r\n\r\nhello all\r\n"
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
        assert smtp.sendmail(SENDER, USERS, body) == {}
    stored = [copies(r, a, body) for a in USERS]
    assert all(len(c) == 1 for c in stored)
    assert len({c[0] for c in stored}) == 1  # the same bytes everywhere, one Received: id
    capsys.readouterr()
    assert main(["status", "--format", "json", "--redis-url", settings.redis_url]) == 0
    status = json.loads(capsys.readouterr().out)
    # 12 users over store0 and store1: 6 copies each, counted though they sit on three nodes.
    assert {n: row["messages"] for n, row in status["mailstores"].items()} == {"store0": 6, "store1": 6}
    assert status["redis"]["primaries"] == 3 and status["redis"]["aof_enabled"] is True


def test_partial_write_is_451_and_the_retry_is_stored_once(cluster: RedisClusterServers, r: redis.Redis,
                                                           settings: Any, tmp_path: Path,
                                                           receiver_factory: Any,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, tmp_path, capsys)
    alice = USERS[0]
    bob = next(a for a in USERS if cluster.primary_of(keys.mbx(a)) != cluster.primary_of(keys.mbx(alice)))
    rt = receiver_factory(directory_cache_ttl=60.0)
    body = b"Subject: twice\r\nMessage-ID: <twice@remote.test>\r\n\r\nonce only\r\n"
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:  # RCPT lookups cached before the node fills up
        smtp.ehlo("x")
        for a in (alice, bob):
            smtp.mail(SENDER)
            assert smtp.rcpt(a)[0] == 250
            smtp.rset()
    full = cluster.client(cluster.primary_of(keys.mbx(bob)))
    full.config_set("maxmemory", 1)
    try:
        with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
            smtp.ehlo("x")
            smtp.mail(SENDER)
            smtp.rcpt(alice)
            smtp.rcpt(bob)
            code, reply = smtp.data(body)
    finally:
        full.config_set("maxmemory", 0)
        full.close()
    assert (code, reply) == (451, b"4.3.0 Temporary storage problem, please try again later")
    assert len(copies(r, alice, body)) == 1 and not copies(r, bob, body)  # one slot was written
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:  # the sender's retry: same envelope and bytes
        assert smtp.sendmail(SENDER, [alice, bob], body) == {}
    assert len(copies(r, alice, body)) == 1 and len(copies(r, bob, body)) == 1
    stats = store.mailstore_stats(r)
    # Never counted twice; the status counters are a separate best-effort write, so one may be
    # missing when its shard sat on the node that was full.
    assert 1 <= sum(v.get("messages", 0) for v in stats.values()) <= 2


def test_webmail_read_and_send_with_outbound(r: redis.Redis, settings: Any, tmp_path: Path,
                                            receiver_factory: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, tmp_path, capsys)
    alice, bob = USERS[0], USERS[5]
    rt = receiver_factory()
    body = b"From: someone@remote.test\r\nSubject: read me on a cluster\r\n\r\nhi alice\r\n"
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
        smtp.sendmail(SENDER, [alice], body)
    [msg_id] = [i.decode() for i in r.zrange(keys.folder(alice, fields.INBOX), 0, -1)]
    web = make_app(settings, r).test_client()
    log_in_as(web, alice)
    assert "read me on a cluster" in web.get("/").text
    assert "read me on a cluster" in web.get("/?group=1").text  # conversations: alice's slot too
    assert web.get(f"/message/{msg_id}").status_code == 200
    assert not r.sismember(keys.unseen(alice), msg_id)  # read: \Seen, in alice's slot
    page = web.get("/compose").text
    form = {name: re.search(rf'name="{name}"[^>]*?value="([^"]*)"', page).group(1)  # type: ignore[union-attr]
            for name in ("csrf_token", "draft", "draft_sig", "reply_to", "forward_of")}
    sink = SmtpSink().start()
    worker = WorkerThread(load_settings(
        {"redis_url": settings.redis_url, "smarthost": f"127.0.0.1:{sink.port}", "smarthost_tls": "none",
         "retry_base": "0.2", "claim_timeout": "1", "hostname": "fallback.test"}, env={})).start()
    try:
        resp = web.post("/compose", content_type="multipart/form-data", data={
            **form, "to": f"{bob}, friend@elsewhere.test", "cc": "", "bcc": "",
            "subject": "sent from a cluster", "body": "both of you"})
        assert resp.status_code == 302
        assert any(b"sent from a cluster" in c for c in copies(r, bob, b"both of you\r\n"))
        wait_for(lambda: any(b"sent from a cluster" in m for m in sink.messages()),
                 30, "the smarthost to receive the message")
        [sent_id] = [i.decode() for i in r.zrange(keys.folder(alice, fields.SENT), 0, -1)]
        wait_for(lambda: not r.sismember(keys.outbox(alice), sent_id), 30, "the record to finish")
    finally:
        worker.stop()
        sink.cleanup()


def test_reconcile_every_mailbox_into_dovecot(r: redis.Redis, settings: Any, tmp_path: Path,
                                              receiver_factory: Any, dovecot_factory: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, tmp_path, capsys)
    server = dovecot_factory(USERS)
    rt = receiver_factory()
    bodies = {a: f"Subject: for {a}\r\n\r\nbody of {a}\r\n".encode() for a in USERS}
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
        for a, body in bodies.items():
            smtp.sendmail(SENDER, [a], body)
    s = reconcile_settings(settings, server, tmp_path)
    rc = main(cli_args(s, "--all"))
    assert rc == 0, capsys.readouterr().err
    # Issue 16: the reconcile gauge is exact on a Cluster too (counted in a second step there).
    progress = {(x.labels["mailstore"], x.labels["state"]): x.value
                for f in text_string_to_metric_families(metrics.exposition(r).decode())
                if f.name == "fallback_reconcile_messages" for x in f.samples}
    assert progress == {(m, st): (6 if st == "done" else 0)
                        for m in ("store0", "store1") for st in metrics.RECONCILE_STATES}
    for a in (USERS[0], USERS[7], USERS[11]):
        view = MainStoreView(server, a)
        [got] = view.messages("INBOX")
        view.close()
        assert got["raw"].endswith(bodies[a])  # type: ignore[union-attr]
    rc = main(cli_args(s, "--all"))  # again: nothing left, nothing appended twice
    assert rc == 0
    view = MainStoreView(server, USERS[3])
    assert len(view.messages("INBOX")) == 1
    view.close()


# --- a primary dies mid-run ----------------------------------------------------------------

def test_primary_killed_mid_run_acknowledged_mail_survives(tmp_path: Path) -> None:
    c = RedisClusterServers(tmp_path / "cluster").start()
    rt: ReceiverThread | None = None
    try:
        settings = load_settings({"redis_url": c.url, "data_dir": str(tmp_path / "data"),
                                  "hostname": "fallback.test", "smtp_port": 0, "replica_acks": 1,
                                  "replica_ack_timeout": "1",
                                  # 8 clients on one address send up to 480 messages: no rate limit
                                  "max_messages_per_ip_per_minute": 0}, env={})
        r = sync_client(c.url)
        for a in USERS:
            add_mailbox(r, settings, a)
        rt = ReceiverThread(settings).start()
        victim = c.primary_of(keys.mbx(USERS[0]))
        acked: list[tuple[str, str, bytes, float]] = []
        outcomes: Counter[int] = Counter()
        lock = threading.Lock()
        killed = threading.Event()
        deadline = time.monotonic() + 90

        def client(n: int) -> None:
            rng = random.Random(n)
            after_kill = 0
            for i in range(60):
                if time.monotonic() > deadline or after_kill >= 5:
                    return
                after_kill += killed.is_set()
                rcpt = rng.choice(USERS)
                body = f"Subject: {n}-{i}\r\n\r\nmessage {n}-{i} {rng.random()}\r\n".encode()
                try:
                    with smtplib.SMTP("127.0.0.1", rt.port, timeout=30) as smtp:  # type: ignore[union-attr]
                        smtp.ehlo("x")
                        smtp.mail(SENDER)
                        code, _ = smtp.rcpt(rcpt)
                        if code != 250:
                            with lock:
                                outcomes[code] += 1
                            continue
                        code, reply = smtp.data(body)
                except (smtplib.SMTPException, OSError):
                    with lock:
                        outcomes[0] += 1
                    continue
                with lock:
                    outcomes[code] += 1
                    if code == 250:
                        msg_id = reply.decode().rpartition("id=")[2]
                        acked.append((rcpt, msg_id, body, time.monotonic()))
                        if len(acked) == 120:
                            killed_at.append(time.monotonic())
                            victim.kill()
                            killed.set()

        killed_at: list[float] = []
        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert killed.is_set(), f"the kill never happened: {outcomes}"
        # The killed primary's replica takes over its slots.
        def promoted() -> bool:
            try:
                return c.primary_of(keys.mbx(USERS[0])) is not victim
            except AssertionError:  # nobody serves the slots yet
                return False

        wait_for(promoted, 60, "a replica to be promoted")
        print(f"\noutcomes {dict(outcomes)}; {len(acked)} acknowledged")
        before = [a for a in acked if a[3] <= killed_at[0]]
        assert any(c.primary_of(keys.mbx(a[0])) is c.primary_of(keys.mbx(USERS[0])) for a in before), \
            "no acknowledged message had gone to the killed primary's slots"
        check = sync_client(c.url)
        missing = [(rcpt, msg_id) for rcpt, msg_id, body, _ in acked
                   if not (record.read_raw(check, keys.message(rcpt, msg_id))
                           or b"").endswith(body)]
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost: {missing[:3]}"

        def accepted_again() -> bool:
            with smtplib.SMTP("127.0.0.1", rt.port, timeout=30) as smtp:  # type: ignore[union-attr]
                try:
                    smtp.sendmail(SENDER, [USERS[0]], b"Subject: after\r\n\r\nafter the failover\r\n")
                except smtplib.SMTPException:
                    return False
            return True

        # The promoted replica has no replica of its own, so with replica_acks=1 its slots answer
        # 451 until the old primary comes back, rejoining as its replica.  The receiver finds
        # the new topology by itself (redis-py re-reads it).
        victim.start()
        wait_for(accepted_again, 60, "the receiver to accept mail for the failed-over slots")
        assert c.primary_of(keys.mbx(USERS[0])) is not victim
    finally:
        if rt is not None:
            rt.stop()
        c.stop()



def test_one_full_recipient_among_several_slots_is_refused_whole(r: redis.Redis, settings: Any,
                                                                  mailboxes: list[str],
                                                                  receiver_factory: Any) -> None:
    """tests/test_quota.py's case on the cluster, where alice and bob are in different slots:
    the message waits for both (nothing stored twice on the retry)."""
    from tests.test_quota import ALICE, BOB, test_several_recipients_one_full

    assert key_slot(keys.mbx(ALICE).encode()) != key_slot(keys.mbx(BOB).encode())
    test_several_recipients_one_full(r, settings, mailboxes, receiver_factory)
