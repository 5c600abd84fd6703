"""Reconcile under faults: a connection cut mid-APPEND, SIGKILL part-way, and the full SMTP-to-Dovecot flow.

The cut connection comes from a loopback TCP proxy (reconcile_helpers.CuttingProxy)
placed in front of the real Dovecot: it is the one fault a real server does not produce
on demand.  Everything else is the real thing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fallback import keys
from fallback.cli import main
from fallback.mailbox import fields, record
from tests.dovecot import DovecotServer, MainStoreView
from tests.reconcile_helpers import (
    CuttingProxy,
    cli_args,
    ids_on_disk,
    message,
    provision,
    put,
    read_report,
    reconcile_settings,
    run_engine,
    state,
)
from tests.servers import ROOT

pytestmark = pytest.mark.dovecot
ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.mark.parametrize("mode", ["literal", "reply"])
def test_connection_dropped_mid_append(r, settings, dovecot, tmp_path: Path, mode: str) -> None:
    proxy = CuttingProxy(dovecot.port, nth=3, mode=mode).start()
    try:
        # One APPEND per message: the cut hits the third message (MULTIAPPEND batches cut
        # mid-command: tests/test_reconcile_batch.py).
        direct = reconcile_settings(settings, dovecot, tmp_path, reconcile_concurrency=1,
                                    reconcile_append_batch=1)
        via_proxy = replace(direct, imap_url=proxy.url)
        # Reconcile goes in id order; ids made in the same millisecond are not ordered among
        # themselves, so sort them to know which one is the third APPEND.
        alice = sorted(put(r, ALICE, raw, i) for i, raw in (message(ALICE, f"m{n}") for n in range(5)))
        bob = [put(r, BOB, raw, i) for i, raw in (message(BOB, f"b{n}") for n in range(3))]

        report = run_engine(via_proxy, [ALICE, BOB])
        assert proxy.fired
        a = report.mailboxes[ALICE]
        assert not report.ok
        assert a.appended == 2 and len(a.failed) == 1
        assert "connection lost during APPEND (APPEND: connection closed" in a.failed[0].reason
        assert "outcome unknown" in a.failed[0].reason
        assert a.failed[0].id == alice[2] and a.left == 3
        assert report.mailboxes[BOB].appended == 3   # the others go on
        st = state(r, ALICE, alice[2])
        assert st["rstate"] == "appending" and "outcome unknown" in st["rerror"]
        assert [state(r, ALICE, i)["rstate"] for i in alice[3:]] == ["pending", "pending"]
        assert all(record.read_raw(r, keys.message(ALICE, i)) for i in alice)   # nothing deleted

        report = run_engine(direct, [ALICE, BOB])
        assert report.ok, report.as_json()
        a = report.mailboxes[ALICE]
        if mode == "reply":    # stored before the cut: found by its id, not appended twice
            assert (a.already_present, a.appended) == (1, 2)
        else:                  # never stored: appended now
            assert (a.already_present, a.appended) == (0, 3)
        assert Counter(ids_on_disk(dovecot, ALICE)) == Counter(alice)
        assert Counter(ids_on_disk(dovecot, BOB)) == Counter(bob)
        assert {state(r, ALICE, i)["rstate"] for i in alice} == {"done"}
    finally:
        proxy.stop()


def _spawn(settings, report: Path, concurrency: int) -> subprocess.Popen[bytes]:
    args = cli_args(settings, "--all", "--concurrency", str(concurrency), "--report", str(report))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "fallback", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_part_way_then_rerun_delivers_each_message_once(r, settings, dovecot_factory,
                                                                tmp_path: Path) -> None:
    users = [f"user{n:02d}@example.com" for n in range(24)]
    server: DovecotServer = dovecot_factory(users)
    provision(r, settings, users)
    s = reconcile_settings(settings, server, tmp_path)
    expected: dict[str, list[str]] = {u: [] for u in users}
    body = (b"x" * 76 + b"\r\n") * 50   # about 4 KiB
    for n in range(25):
        for u in users:
            msg_id, raw = message(u, f"message {n}", body=body)
            folder = fields.SENT if n % 10 == 3 else fields.INBOX
            expected[u].append(put(r, u, raw, msg_id, folder=folder, flags=(fields.SEEN,) if n % 2 else ()))
    total = sum(len(v) for v in expected.values())
    assert total >= 500

    def on_disk() -> int:   # files only, no reading: cheap enough to poll tightly
        n = 0
        for u in users:
            for sub in ("new", "cur", ".Sent Items/new", ".Sent Items/cur"):
                with contextlib.suppress(FileNotFoundError):
                    n += len(os.listdir(server.maildirs / u / "Maildir" / sub))
        return n

    # Kill runs about 60 messages in, until a kill lands between an APPEND and its record
    # (the message is in Dovecot, Redis still says `appending`), then run to the end.
    window: set[str] = set()
    kills = 0
    while not window and kills < 8:
        threshold = on_disk() + 60
        proc = _spawn(s, tmp_path / "killed.json", concurrency=2)
        deadline = time.monotonic() + 120
        while on_disk() < threshold and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert proc.poll() is None, "reconcile finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
        kills += 1
        appending = {i for u in users for i in expected[u]
                     if r.hget(keys.message(u, i), "rstate") == b"appending"}
        window = appending & {i for u in users for i in ids_on_disk(server, u)}
    assert window, f"no kill out of {kills} landed between APPEND and its record"

    assert on_disk() < total
    proc = _spawn(s, tmp_path / "final.json", concurrency=4)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()
    # Those were found by their id, not appended again.
    assert read_report(tmp_path / "final.json")["totals"]["already_present"] >= len(window)
    for u in users:
        assert Counter(ids_on_disk(server, u)) == Counter(expected[u]), u
        assert r.scard(keys.pending(u)) == 0
    assert {r.hget(keys.message(u, i), "rstate") for u in users for i in expected[u]} == {b"done"}


def test_full_flow_smtp_webmail_reconcile(receiver, r, settings, dovecot, tmp_path: Path, capsys) -> None:
    """SMTP in -> read, flagged and one trashed in the real webmail -> reconciled -> in Dovecot."""
    from tests.webutil import log_in_as, make_app

    raw_in = (b"From: Sender <sender@remote.test>\r\nTo: alice@example.com\r\nSubject: outage mail\r\n"
              b"Message-ID: <flow@remote.test>\r\n\r\nPlease read me.\r\n")
    junk_in = b"From: spam@remote.test\r\nTo: alice@example.com\r\nSubject: junk\r\n\r\nbuy\r\n"
    with smtplib.SMTP("127.0.0.1", receiver.port) as client:
        client.sendmail("sender@remote.test", [ALICE], raw_in)
        client.sendmail("spam@remote.test", [ALICE], junk_in)
    ids = [i.decode() for i in r.zrange(keys.folder(ALICE, fields.INBOX), 0, -1)]
    stored = {i: record.read_raw(r, keys.message(ALICE, i)) for i in ids}
    [msg_id] = [i for i, raw in stored.items() if raw.endswith(raw_in)]
    [junk_id] = [i for i, raw in stored.items() if raw.endswith(junk_in)]

    web = make_app(settings, r).test_client()
    token = log_in_as(web, ALICE)
    assert web.get(f"/message/{msg_id}").status_code == 200          # read: \Seen
    resp = web.post(f"/message/{msg_id}/flags", data={"action": "flag", "csrf_token": token})
    assert resp.status_code == 302                                    # flagged
    resp = web.post(f"/message/{junk_id}/delete", data={"csrf_token": token})
    assert resp.status_code == 302                                    # to Trash

    s = reconcile_settings(settings, dovecot, tmp_path)
    rc = main(cli_args(s, "--user", ALICE))
    assert rc == 0, capsys.readouterr().err
    view = MainStoreView(dovecot, ALICE)
    [got] = view.messages("INBOX")
    [trashed] = view.messages("Deleted Items")
    view.close()
    assert got["raw"] == stored[msg_id]
    assert got["flags"] - {"\\Recent"} == {"\\Seen", "\\Flagged"}
    assert f"id {msg_id}".encode() in got["raw"]   # the header reconcile searches by
    assert trashed["raw"] == stored[junk_id]
