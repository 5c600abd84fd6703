"""fallback_reconcile_messages{mailstore, state} against the real states, around a partial reconcile.

Mail comes in through the real receiver (carol on her own mailstore) and the
delivery code; reconcile runs into a real Dovecot through a proxy that cuts the
connection at one APPEND (a message left `appending`) and with a quota that
refuses some of bob's (`failed`); carol is not reconciled (`pending`).  After
each step the gauge of /metrics must equal the states read from every message
hash, and purge and Empty Trash must take theirs off it.
"""

from __future__ import annotations

import smtplib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from fallback import keys
from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox import directory, expunge, fields, store
from fallback.ops import metrics
from tests.reconcile_helpers import CuttingProxy, message, put, reconcile_settings, run_engine
from tests.webutil import simple

pytestmark = pytest.mark.dovecot
ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.org"


def real_states(r: redis.Redis, addresses: list[str]) -> Counter[tuple[str, str]]:
    """(mailstore, state) -> messages, read from every message hash (a test may scan)."""
    out: Counter[tuple[str, str]] = Counter()
    for address in addresses:
        mailstore = (r.hget(keys.info(address), "mailstore") or b"default").decode()
        for key in r.scan_iter(match=keys.message(address, "*"), count=1000):
            state = (r.hget(key, "rstate") or b"pending").decode()
            out[(mailstore, state)] += 1
    return out


def gauge(r: redis.Redis) -> Counter[tuple[str, str]]:
    """The gauge as /metrics writes it, parsed back."""
    out: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(metrics.exposition(r).decode()):
        if family.name == "fallback_reconcile_messages":
            for s in family.samples:
                out[(s.labels["mailstore"], s.labels["state"])] = int(s.value)
    return out


def same(r: redis.Redis) -> Counter[tuple[str, str]]:
    real = real_states(r, [ALICE, BOB, CAROL])
    shown = gauge(r)
    assert +shown == +real, (shown, real)     # + drops zero entries
    for mailstore in {m for m, _ in real}:    # every state is shown, zeros too
        assert {s for m, s in shown if m == mailstore} == set(metrics.RECONCILE_STATES)
    return real


def test_gauge_follows_a_partial_reconcile_and_purge(r: redis.Redis, settings: Settings, mailboxes: Any,
                                                     receiver_factory: Any, dovecot_factory: Any,
                                                     tmp_path: Path) -> None:
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    d.put(directory.Mailbox(CAROL, "store2", d.get(CAROL).password_hash))
    receiver = receiver_factory()
    with smtplib.SMTP("127.0.0.1", receiver.port, timeout=30, source_address=("127.0.0.2", 0)) as s:
        for n in range(3):
            s.sendmail("ann@remote.test", [ALICE, CAROL], simple(subject=f"both {n}"))
    with smtplib.SMTP("127.0.0.1", receiver.port, timeout=30, source_address=("127.0.0.3", 0)) as s:
        s.sendmail("ann@remote.test", [ALICE], simple(subject="alice only"))
    for n in range(4):
        msg_id, raw = message(BOB, f"big {n}", body=b"y" * 5000 + b"\r\n")
        put(r, BOB, raw, msg_id)
    assert same(r) == {("default", "pending"): 8, ("store2", "pending"): 3}

    server = dovecot_factory([])
    server.add_users([ALICE, CAROL])
    server.add_users([BOB], quota="12K")   # room for two of bob's four
    server.write_users()
    # One APPEND per message (issue 17's MULTIAPPEND would cut all of alice's at once).
    direct = reconcile_settings(settings, server, tmp_path, reconcile_concurrency=1,
                                reconcile_append_batch=1)
    proxy = CuttingProxy(server.port, nth=2, mode="reply").start()
    try:
        report = run_engine(replace(direct, imap_url=proxy.url), [ALICE, BOB])
    finally:
        proxy.stop()
    assert proxy.fired and not report.ok
    real = same(r)
    assert real[("default", "appending")] == 1        # the cut APPEND: stored, outcome unknown
    assert real[("default", "failed")] >= 1           # bob over quota
    assert real[("default", "done")] >= 1
    assert real[("store2", "pending")] == 3           # carol's mailstore not reconciled yet

    run_engine(direct, [ALICE, BOB])                  # again: the appending one is found, not doubled
    real = same(r)
    assert real[("default", "appending")] == 0 and real[("default", "done")] == 4 + 2
    assert real[("default", "failed")] == 2

    assert main(["purge", "--redis-url", settings.redis_url or "", "--reconciled", "--yes"]) == 0
    real = same(r)
    assert real == {("default", "failed"): 2, ("store2", "pending"): 3}

    # Deleted for good by their users (Empty Trash): a failed one of bob's, a pending one of carol's.
    for address, wanted in ((BOB, b"failed"), (CAROL, b"pending")):
        key = next(k for k in r.scan_iter(match=keys.message(address, "*"), count=1000)
                   if (r.hget(k, "rstate") or b"pending") == wanted)  # absent: pending (layout 2)
        assert store.move(r, address, key.decode().rpartition(":")[2], fields.TRASH)
        assert expunge.empty_trash(r, address).deleted == 1
    assert same(r) == {("default", "failed"): 1, ("store2", "pending"): 2}
