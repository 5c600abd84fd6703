"""Reconcile's batched paths (issue 17): MULTIAPPEND runs and a big mailbox over several connections.

Against the real Dovecot (which offers MULTIAPPEND, LITERAL+ and UIDPLUS); the cut
connection comes from reconcile_helpers.CuttingProxy, cutting the Nth APPEND command --
with batches, a command that carries several messages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fallback import keys
from fallback.config import load_settings
from fallback.errors import ConfigError
from fallback.mailbox import record
from fallback.reconcile.imap import uid_set
from tests.dovecot import MainStoreView
from tests.reconcile_helpers import (
    CuttingProxy,
    ids_on_disk,
    message,
    put,
    reconcile_settings,
    run_engine,
    state,
)

pytestmark = pytest.mark.dovecot
ALICE, BOB = "alice@example.com", "bob@example.com"


def test_uid_set_in_message_order() -> None:
    assert uid_set("7") == [7]
    assert uid_set("7:9,12") == [7, 8, 9, 12]
    assert uid_set("5:3") == [5, 4, 3]   # RFC 4315 allows a range either way round


@pytest.mark.parametrize(("name", "ok", "bad"), [("reconcile_append_batch", 1000, 1001),
                                                 ("reconcile_mailbox_connections", 10, 11)])
def test_batch_settings_at_and_past_their_limits(name: str, ok: int, bad: int) -> None:
    assert getattr(load_settings({name: str(ok)}, env={}), name) == ok
    assert getattr(load_settings({name: "1"}, env={}), name) == 1
    wording = {"reconcile_append_batch": "must be 1 (one APPEND per message) to 1000",
               "reconcile_mailbox_connections": "must be 1 to 10"}[name]
    for value in (bad, 0):
        with pytest.raises(ConfigError) as err:
            load_settings({name: str(value)}, env={})
        assert str(err.value) == f"{name}: {wording}"


def test_runs_record_each_messages_own_uid(r, settings, dovecot, tmp_path: Path) -> None:
    """9 messages in runs of 4: three MULTIAPPENDs; each id's recorded UID is where it lies."""
    s = reconcile_settings(settings, dovecot, tmp_path, reconcile_append_batch=4)
    ids = sorted(put(r, ALICE, raw, i, flags=("\\Seen",) if n % 2 else ())
                 for n, (i, raw) in enumerate(message(ALICE, f"m{n}") for n in range(9)))
    report = run_engine(s, [ALICE])
    assert report.ok, report.as_json()
    assert report.mailboxes[ALICE].appended == 9 and report.mailboxes[ALICE].left == 0
    view = MainStoreView(dovecot, ALICE)
    try:
        stored = {m["uid"]: m for m in view.messages("INBOX")}
    finally:
        view.close()
    assert len(stored) == 9
    for msg_id in ids:
        st = state(r, ALICE, msg_id)
        assert st["rstate"] == "done"
        found = stored[int(st["ruid"])]
        assert found["raw"] == record.read_raw(r, keys.message(ALICE, msg_id))   # byte for byte
        assert ("\\Seen" in found["flags"]) == ("\\Seen" in st["flags"])


@pytest.mark.parametrize("mode", ["literal", "reply"])
def test_connection_cut_mid_multiappend_then_rerun_appends_each_once(r, settings, dovecot, tmp_path: Path,
                                                                     mode: str) -> None:
    """Runs of 3 over 8 messages; the 2nd command is cut (mid-literal: nothing stored; after
    the whole command: all 3 stored, the OK lost).  Its 3 stay `appending`, the 2 never sent
    go back to `pending`, the 1st run is `done`; a rerun leaves each message on disk once."""
    proxy = CuttingProxy(dovecot.port, nth=2, mode=mode).start()
    try:
        direct = reconcile_settings(settings, dovecot, tmp_path, reconcile_concurrency=1,
                                    reconcile_append_batch=3)
        alice = sorted(put(r, ALICE, raw, i) for i, raw in (message(ALICE, f"m{n}") for n in range(8)))
        report = run_engine(replace(direct, imap_url=proxy.url), [ALICE])
        assert proxy.fired and not report.ok
        a = report.mailboxes[ALICE]
        assert a.appended == 3 and [f.id for f in a.failed] == alice[3:6]
        for f in a.failed:
            assert f.reason.startswith("connection lost during APPEND (APPEND: connection closed")
            assert f.reason.endswith("outcome unknown, the next run looks it up by id before appending "
                                     "again")
        assert [state(r, ALICE, i)["rstate"] for i in alice] == ["done"] * 3 + ["appending"] * 3 + \
            ["pending"] * 2
        assert a.left == 5
        assert all(record.read_raw(r, keys.message(ALICE, i)) for i in alice)   # nothing deleted

        report = run_engine(direct, [ALICE])
        assert report.ok, report.as_json()
        a = report.mailboxes[ALICE]
        if mode == "reply":    # stored before the cut: found by id, not appended again
            assert (a.already_present, a.appended) == (3, 2)
        else:
            assert (a.already_present, a.appended) == (0, 5)
        assert Counter(ids_on_disk(dovecot, ALICE)) == Counter(alice)
        assert {state(r, ALICE, i)["rstate"] for i in alice} == {"done"}
        assert r.scard(keys.pending(ALICE)) == 0
    finally:
        proxy.stop()


def test_refused_multiappend_goes_again_one_by_one(r, settings, dovecot_factory, mailboxes,
                                                   tmp_path: Path) -> None:
    """Over quota: the server stores none of a MULTIAPPEND, so each message goes on its own and
    only those past the quota fail, kept for the next run."""
    server = dovecot_factory([])
    server.add_users([BOB], quota="12K")
    server.write_users()
    s = reconcile_settings(settings, server, tmp_path, reconcile_append_batch=50)
    ids = sorted(put(r, BOB, raw, i) for i, raw in (message(BOB, f"big {n}", body=b"y" * 5000 + b"\r\n")
                                                    for n in range(4)))
    report = run_engine(s, [BOB])
    bob = report.mailboxes[BOB]
    assert bob.appended == 2 and len(bob.failed) == 2    # 2 x ~5 KB fit in 12 K, a 3rd does not
    assert [f.id for f in bob.failed] == ids[2:]
    assert all("Quota exceeded" in f.reason for f in bob.failed)
    assert sorted(ids_on_disk(server, BOB)) == ids[:2]
    for msg_id in ids[2:]:
        st = state(r, BOB, msg_id)
        assert st["rstate"] == "failed" and "Quota exceeded" in st["rerror"]
        assert r.sismember(keys.pending(BOB), msg_id) and record.read_raw(r, keys.message(BOB, msg_id))


def test_big_mailbox_over_several_connections_each_message_once(r, settings, dovecot, tmp_path: Path
                                                                ) -> None:
    """350 messages = 4 chunks over 3 connections (and one chunk of Bob's on its own)."""
    s = reconcile_settings(settings, dovecot, tmp_path, reconcile_mailbox_connections=3,
                           reconcile_concurrency=2)
    alice = [put(r, ALICE, raw, i) for i, raw in (message(ALICE, f"m{n}") for n in range(350))]
    bob = [put(r, BOB, raw, i) for i, raw in (message(BOB, f"b{n}") for n in range(5))]
    report = run_engine(s, [ALICE, BOB])
    assert report.ok, report.as_json()
    assert report.mailboxes[ALICE].appended == 350 and report.mailboxes[ALICE].left == 0
    assert report.mailboxes[BOB].appended == 5
    assert Counter(ids_on_disk(dovecot, ALICE)) == Counter(alice)
    assert Counter(ids_on_disk(dovecot, BOB)) == Counter(bob)
    uids = [int(state(r, ALICE, i)["ruid"]) for i in alice]
    assert len(set(uids)) == 350
    assert "extra connection failed" not in dovecot.log_text()
