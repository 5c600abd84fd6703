"""Reconcile into a real Dovecot: bytes, flags, dates, folders, re-runs and the edge cases."""

from __future__ import annotations

import calendar
import time
from collections import Counter
from pathlib import Path

import pytest

from fallback import keys
from fallback.cli import build_parser, main
from fallback.config import load_settings
from fallback.mailbox import fields, record, store
from fallback.reconcile.imap import decode_mailbox, encode_mailbox
from tests.dovecot import MainStoreView
from tests.reconcile_helpers import (
    cli_args,
    ids_on_disk,
    message,
    put,
    put_new,
    read_report,
    reconcile_settings,
    run_engine,
    state,
)

pytestmark = pytest.mark.dovecot
ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.org"


def _epoch(date_tuple: object) -> int:
    return int(time.mktime(date_tuple))  # type: ignore[arg-type]


def test_byte_for_byte_flags_dates_and_folders(r, settings, dovecot, tmp_path: Path, capsys) -> None:
    s = reconcile_settings(settings, dovecot, tmp_path)
    stored: dict[str, tuple[str, bytes, str, tuple[str, ...]]] = {}
    # 8-bit body, a long line, no Message-ID, and two different messages with one Message-ID.
    cases = [
        (ALICE, "plain", {}, ()),
        (ALICE, "read+flagged", {}, (fields.SEEN, fields.FLAGGED)),
        (ALICE, "answered+forwarded", {}, (fields.SEEN, fields.ANSWERED, fields.FORWARDED)),
        (ALICE, "no message-id", {"msgid": None}, ()),
        (ALICE, "same id 1", {"msgid": "<dup@remote.test>"}, ()),
        (ALICE, "same id 2", {"msgid": "<dup@remote.test>", "body": b"other body\r\n"}, ()),
        (BOB, "8bit", {"body": "Grüße, naïve café\r\n".encode() + b"x" * 5000 + b"\r\n"}, ()),
        (CAROL, "carol", {}, (fields.SEEN,)),
    ]
    for address, subject, kw, flags in cases:
        msg_id, raw = message(address, subject, **kw)  # type: ignore[arg-type]
        put(r, address, raw, msg_id, flags=flags)
        stored[msg_id] = (address, raw, fields.INBOX, flags)
    sent_id, sent_raw = message(ALICE, "sent from the webmail")
    put(r, ALICE, sent_raw, sent_id, folder=fields.SENT, flags=(fields.SEEN,), kind="sent")
    stored[sent_id] = (ALICE, sent_raw, "Sent Items", (fields.SEEN,))
    trash_id, trash_raw = message(BOB, "deleted in the webmail")
    put(r, BOB, trash_raw, trash_id)
    assert store.move(r, BOB, trash_id, fields.TRASH)
    stored[trash_id] = (BOB, trash_raw, "Deleted Items", ())
    time.sleep(1.1)  # INTERNALDATE must be the stored time, not the APPEND time

    report_path = tmp_path / "report.json"
    rc = main(cli_args(s, "--all", "--report", str(report_path)))
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = read_report(report_path)
    assert report["totals"]["appended"] == len(stored)
    assert report["totals"]["left"] == 0
    assert report["mailboxes"][ALICE]["appended"] == 7
    assert report["mailboxes"][BOB]["failed"] == []
    assert "appended" in out.out

    for address in (ALICE, BOB, CAROL):
        view = MainStoreView(dovecot, address)
        by_folder = {f: view.messages(f) for f in ("INBOX", "Sent Items", "Deleted Items")}
        view.close()
        mine = {m: v for m, v in stored.items() if v[0] == address}
        assert sum(len(v) for v in by_folder.values()) == len(mine)
        for msg_id, (_, raw, folder, flags) in mine.items():
            [got] = [m for m in by_folder[folder] if m["raw"] == raw]
            assert got["flags"] - {"\\Recent"} == set(flags)
            ts = int(state(r, address, msg_id)["ts"])
            assert _epoch(got["date"]) == ts // 1000
            st = state(r, address, msg_id)
            assert st["rstate"] == "done" and st["ruid"] == str(got["uid"])
            assert decode_mailbox(st["rbox"]) == folder
        assert r.scard(keys.pending(address)) == 0

    # A second run finds nothing to do and appends nothing.
    rc = main(cli_args(s, "--all"))
    assert rc == 0
    assert "nothing to reconcile" in capsys.readouterr().out
    assert Counter(ids_on_disk(dovecot, ALICE)) == Counter({m: 1 for m, v in stored.items() if v[0] == ALICE})


def test_webmail_changes_after_reconcile_are_carried(r, settings, dovecot, tmp_path: Path) -> None:
    s = reconcile_settings(settings, dovecot, tmp_path)
    ida, rawa = message(ALICE, "to be flagged")
    idb, rawb = message(ALICE, "to be trashed")
    idc, rawc = message(ALICE, "to be unread")
    put(r, ALICE, rawa, ida)
    put(r, ALICE, rawb, idb, flags=(fields.SEEN,))
    put(r, ALICE, rawc, idc, flags=(fields.SEEN,))
    assert run_engine(s, [ALICE]).ok

    assert store.set_flags(r, ALICE, ida, add=(fields.SEEN, fields.FLAGGED))
    assert store.move(r, ALICE, idb, fields.TRASH)
    assert store.set_flags(r, ALICE, idc, remove=(fields.SEEN,))
    report = run_engine(s, [ALICE])
    assert report.ok, report.as_json()
    assert report.mailboxes[ALICE].updated == 3
    assert report.mailboxes[ALICE].appended == 0

    view = MainStoreView(dovecot, ALICE)
    inbox = {m["raw"]: m for m in view.messages("INBOX")}
    trash = {m["raw"]: m for m in view.messages("Deleted Items")}
    view.close()
    assert inbox[rawa]["flags"] - {"\\Recent"} == {"\\Seen", "\\Flagged"}
    assert inbox[rawc]["flags"] - {"\\Recent"} == set()
    assert rawb not in inbox and trash[rawb]["flags"] - {"\\Recent"} == {"\\Seen"}
    assert state(r, ALICE, idb)["ruid"] == str(trash[rawb]["uid"])   # from COPYUID
    assert sorted(ids_on_disk(dovecot, ALICE)) == sorted([ida, idb, idc])
    assert r.scard(keys.pending(ALICE)) == 0


def test_uidvalidity_change_between_runs(r, settings, dovecot, tmp_path: Path) -> None:
    """The mailbox is rebuilt (as after a restore): UIDs are found again by our id, or re-appended."""
    s = reconcile_settings(settings, dovecot, tmp_path)
    kept_id, kept_raw = message(ALICE, "kept by the restore")
    lost_id, lost_raw = message(ALICE, "lost by the restore")
    put(r, ALICE, kept_raw, kept_id)
    put(r, ALICE, lost_raw, lost_id)
    assert run_engine(s, [ALICE]).ok
    old = state(r, ALICE, kept_id)["ruidvalidity"]
    time.sleep(1.1)  # Dovecot derives a new UIDVALIDITY from the clock

    maildir = dovecot.maildirs / ALICE / "Maildir"
    for f in maildir.glob("dovecot*"):
        f.unlink()
    for f in [*(maildir / "cur").iterdir(), *(maildir / "new").iterdir()]:
        if lost_id.encode() in f.read_bytes():
            f.unlink()
    assert store.set_flags(r, ALICE, kept_id, add=(fields.FLAGGED,))
    assert store.set_flags(r, ALICE, lost_id, add=(fields.SEEN,))

    report = run_engine(s, [ALICE])
    assert report.ok, report.as_json()
    assert report.mailboxes[ALICE].updated == 1
    assert report.mailboxes[ALICE].appended == 1
    view = MainStoreView(dovecot, ALICE)
    inbox = {m["raw"]: m for m in view.messages("INBOX")}
    view.close()
    assert state(r, ALICE, kept_id)["ruidvalidity"] != old
    assert inbox[kept_raw]["flags"] - {"\\Recent"} == {"\\Flagged"}
    assert inbox[lost_raw]["flags"] - {"\\Recent"} == {"\\Seen"}
    assert sorted(ids_on_disk(dovecot, ALICE)) == sorted([kept_id, lost_id])


@pytest.mark.parametrize("name", ["Gesendete Elemente", "Papierkorb & Müll/Ärger", "日本語 送信済み"])
def test_modified_utf7_round_trip(name: str) -> None:
    wire = encode_mailbox(name)
    assert wire.isascii() and decode_mailbox(wire) == name
    assert encode_mailbox("A&B") == "A&-B"
    assert encode_mailbox("Entwürfe") == "Entw&APw-rfe"   # RFC 3501's own style of example


def test_folder_names_with_spaces_and_non_ascii(r, settings, dovecot_factory, mailboxes,
                                               tmp_path: Path) -> None:
    server = dovecot_factory(mailboxes, special_use=False)
    s = reconcile_settings(settings, server, tmp_path, reconcile_sent_folder="Gesendete Objekte",
                           reconcile_trash_folder="Papierkorb & Müll")
    # The same settings as flags reach the same fields.
    ns = build_parser().parse_args(cli_args(s, "--all", "--reconcile-sent-folder", "Gesendete Objekte",
                                            "--reconcile-trash-folder", "Papierkorb & Müll"))
    flagged = load_settings(vars(ns), env={})
    assert (flagged.reconcile_sent_folder, flagged.reconcile_trash_folder) == (
        s.reconcile_sent_folder, s.reconcile_trash_folder)
    sent_id, sent_raw = message(ALICE, "sent")
    put(r, ALICE, sent_raw, sent_id, folder=fields.SENT, flags=(fields.SEEN,), kind="sent")
    trash_id, trash_raw = message(ALICE, "trash")
    put(r, ALICE, trash_raw, trash_id, folder=fields.TRASH)
    report = run_engine(s, [ALICE])
    assert report.ok, report.as_json()
    assert sorted(report.mailboxes[ALICE].folders_created) == ["Gesendete Objekte", "Papierkorb & Müll"]
    view = MainStoreView(server, ALICE)
    assert "Papierkorb &- M&APw-ll" in view.folders()
    assert [m["raw"] for m in view.messages("Gesendete Objekte")] == [sent_raw]
    assert [m["raw"] for m in view.messages("Papierkorb &- M&APw-ll")] == [trash_raw]
    view.close()
    # The next run finds the folders it made instead of making them again.
    idc, rawc = message(ALICE, "later")
    put(r, ALICE, rawc, idc, folder=fields.SENT, kind="sent")
    report = run_engine(s, [ALICE])
    assert report.ok and report.mailboxes[ALICE].folders_created == []


def test_over_quota_is_reported_kept_and_retried(r, settings, dovecot_factory, mailboxes,
                                                tmp_path: Path, capsys) -> None:
    server = dovecot_factory([])
    server.add_users([ALICE, CAROL])
    server.add_users([BOB], quota="12K")
    server.write_users()
    s = reconcile_settings(settings, server, tmp_path)
    bob_ids = [put(r, BOB, raw, i) for i, raw in (message(BOB, f"big {n}", body=b"y" * 5000 + b"\r\n")
                                                  for n in range(4))]
    alice_id = put_new(r, ALICE, "fine")

    report_path = tmp_path / "report.json"
    rc = main(cli_args(s, "--all", "--report", str(report_path)))
    captured = capsys.readouterr()
    assert rc == 1
    assert "left" in captured.err
    report = read_report(report_path)
    bob = report["mailboxes"][BOB]
    assert bob["appended"] >= 1 and len(bob["failed"]) >= 1
    assert bob["appended"] + len(bob["failed"]) == 4
    assert all("OVERQUOTA" in f["reason"] or "Quota exceeded" in f["reason"] for f in bob["failed"])
    assert report["mailboxes"][ALICE]["appended"] == 1 and report["totals"]["left"] == len(bob["failed"])
    assert "Quota exceeded" in captured.out
    for f in bob["failed"]:
        st = state(r, BOB, f["id"])
        assert st["rstate"] == "failed" and "Quota exceeded" in st["rerror"]
        assert r.sismember(keys.pending(BOB), f["id"])
        assert record.read_raw(r, keys.message(BOB, f["id"]))   # the message itself is kept
    assert state(r, ALICE, alice_id)["rstate"] == "done"

    server.add_users([BOB], quota="1M")   # the operator raises the quota and runs again
    _wait_quota_limit(server, BOB, 1024)
    rc = main(cli_args(s, "--all"))
    assert rc == 0, capsys.readouterr().err
    assert sorted(ids_on_disk(server, BOB)) == sorted(bob_ids)


def _wait_quota_limit(server, address: str, kib: int) -> None:
    """Until Dovecot has re-read its passwd-file (bounded): GETQUOTAROOT shows the new limit."""
    deadline = time.monotonic() + 15
    while True:
        view = MainStoreView(server, address)
        _, data = view.imap.getquotaroot("INBOX")
        view.close()
        if f" {kib})".encode() in b" ".join(x for x in data[1] if isinstance(x, bytes)):
            return
        assert time.monotonic() < deadline, data
        time.sleep(0.2)


def test_wrong_master_password_changes_nothing(r, settings, dovecot, tmp_path: Path, capsys) -> None:
    s = reconcile_settings(settings, dovecot, tmp_path)
    ids = [put_new(r, a, "x") for a in (ALICE, BOB)]
    before = {i: state(r, a, i) for i, a in zip(ids, (ALICE, BOB), strict=True)}
    bad = tmp_path / "wrong"
    bad.write_text("not-the-password\n")
    args = cli_args(s, "--all")
    args[args.index("--master-password-file") + 1] = str(bad)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "AUTHENTICATIONFAILED" in err
    assert "check --master-user and --master-password-file" in err and "nothing was changed" in err
    assert {i: state(r, a, i) for i, a in zip(ids, (ALICE, BOB), strict=True)} == before
    assert r.scard(keys.pending(ALICE)) == 1 and r.scard(keys.pending(BOB)) == 1
    assert ids_on_disk(dovecot, ALICE) == [] and ids_on_disk(dovecot, BOB) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"--master-password-file": "missing"}, "master_password_file: cannot read"),
    ({"--master-password-file": "empty"}, "is empty"),
    ({"--imap-url": "http://127.0.0.1:1"}, "must look like imap://HOST:PORT"),
    ({"--imap-url": "imap://127.0.0.1:1"}, "cannot connect to imap://127.0.0.1:1"),
    ({"--user": "not-an-address"}, "not an email address"),
    ({"--mailstore": "nosuch"}, "no mailstore 'nosuch'"),
    ({"--concurrency": "0"}, "reconcile_concurrency: must be greater than 0"),
])
def test_bad_input_is_one_clear_line(r, settings, dovecot, tmp_path: Path, capsys, change, expected) -> None:
    s = reconcile_settings(settings, dovecot, tmp_path)
    msg_id = put_new(r, ALICE, "kept")
    (tmp_path / "empty").write_text("")
    args = cli_args(s)
    selection = ["--all"]
    for flag, value in change.items():
        if flag in ("--user", "--mailstore"):
            selection = [flag, value]
        elif flag == "--concurrency":
            selection += [flag, value]
        else:
            path = str(tmp_path / value) if flag == "--master-password-file" else value
            args[args.index(flag) + 1] = path
    rc = main(args + selection)
    err = capsys.readouterr().err
    assert rc == 1
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert state(r, ALICE, msg_id)["rstate"] == "pending"
    assert ids_on_disk(dovecot, ALICE) == []


def test_selection_flag_is_required(settings, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["reconcile", "--imap-url", "imap://127.0.0.1:1"])
    assert exc.value.code == 2
    assert "one of the arguments --user --mailstore --all is required" in capsys.readouterr().err


def test_sasl_plain_with_authorization_id(r, settings, dovecot, tmp_path: Path, capsys) -> None:
    s = reconcile_settings(settings, dovecot, tmp_path)
    msg_id, raw = message(ALICE, "via AUTHENTICATE PLAIN")
    put(r, ALICE, raw, msg_id)
    assert main(cli_args(s, "--user", ALICE, "--master-separator", "")) == 0, capsys.readouterr().err
    view = MainStoreView(dovecot, ALICE)
    assert [m["raw"] for m in view.messages("INBOX")] == [raw]
    view.close()
    assert "method=PLAIN" in dovecot.log_text()


def test_user_missing_in_main_store_does_not_stop_others(r, settings, dovecot_factory, mailboxes,
                                                         tmp_path: Path) -> None:
    server = dovecot_factory([ALICE, BOB])   # carol has no mailbox in the main store
    s = reconcile_settings(settings, server, tmp_path)
    for a in (ALICE, BOB, CAROL):
        put_new(r, a, "hello")
    report = run_engine(s, sorted([ALICE, BOB, CAROL]))
    assert not report.ok
    assert report.mailboxes[CAROL].error is not None
    assert "AUTHORIZATIONFAILED" in report.mailboxes[CAROL].error
    assert report.mailboxes[CAROL].left == 1
    assert report.mailboxes[ALICE].appended == 1 and report.mailboxes[BOB].appended == 1


def test_dry_run_changes_nothing(r, settings, dovecot_factory, mailboxes, tmp_path: Path, capsys) -> None:
    server = dovecot_factory(mailboxes, special_use=False)
    s = reconcile_settings(settings, server, tmp_path)
    ida = put_new(r, ALICE, "in")
    idb = put_new(r, ALICE, "out", folder=fields.SENT, kind="sent")
    report_path = tmp_path / "dry.json"
    rc = main(cli_args(s, "--user", ALICE, "--dry-run", "--report", str(report_path)))
    assert rc == 0, capsys.readouterr().err
    report = read_report(report_path)
    assert report["dry_run"] is True
    assert report["mailboxes"][ALICE]["would_append"] == 2
    assert report["mailboxes"][ALICE]["folders_to_create"] == ["Sent"]
    assert state(r, ALICE, ida)["rstate"] == "pending" and state(r, ALICE, idb)["rstate"] == "pending"
    view = MainStoreView(server, ALICE)
    assert view.folders() == ["INBOX"]
    assert view.messages("INBOX") == []
    view.close()


def test_internaldate_is_the_fallback_time(r, settings, dovecot, tmp_path: Path) -> None:
    """An old stored time (days before the run) is what the main store shows."""
    s = reconcile_settings(settings, dovecot, tmp_path)
    msg_id, raw = message(ALICE, "old")
    put(r, ALICE, raw, msg_id)
    when = calendar.timegm((2026, 11, 20, 8, 30, 15))
    r.hset(keys.message(ALICE, msg_id), "ts", when * 1000 + 789)
    assert run_engine(s, [ALICE]).ok
    view = MainStoreView(dovecot, ALICE)
    [got] = view.messages("INBOX")
    view.close()
    assert _epoch(got["date"]) == when


def test_imaps_checks_the_certificate(r, settings, dovecot_factory, mailboxes, tmp_path: Path,
                                      capsys, monkeypatch) -> None:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    server = dovecot_factory(mailboxes, tls=(cert, key))
    s = reconcile_settings(settings, server, tmp_path)
    assert s.imap_url and s.imap_url.startswith("imaps://")
    msg_id = put_new(r, ALICE, "over TLS")

    # A certificate the system does not trust: one clear line, nothing changed.
    rc = main(cli_args(s, "--user", ALICE))
    err = capsys.readouterr().err
    assert rc == 1 and "certificate verify failed" in err.lower() and "nothing was changed" in err
    assert state(r, ALICE, msg_id)["rstate"] == "pending" and ids_on_disk(server, ALICE) == []

    monkeypatch.setenv("FALLBACK_IMAP_CA_FILE", str(ca_file))
    rc = main(cli_args(s, "--user", ALICE))
    assert rc == 0, capsys.readouterr().err
    assert ids_on_disk(server, ALICE) == [msg_id]


def test_progress_bar_and_summary_on_a_terminal(r, settings, dovecot, tmp_path: Path, capsys,
                                                monkeypatch) -> None:
    import rich.console

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    s = reconcile_settings(settings, dovecot, tmp_path)
    for n in range(3):
        put_new(r, ALICE, f"p{n}")
    put_new(r, BOB, "q")
    assert main(cli_args(s, "--user", ALICE, "--user", BOB)) == 0
    out = capsys.readouterr().out
    assert "mailboxes" in out and "2/2" in out          # the bar: mailboxes done
    assert "messages" in out and "4/4" in out           # and messages done
    assert "/s" in out                                   # with the rate
    assert "appended" in out and "left to do" in out     # the summary table
