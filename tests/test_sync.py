"""`fallback provision --sync`: the directory made equal to the file, removed users' mail kept,
their sessions ended and their new mail refused; --dry-run and --max-remove change nothing."""

from __future__ import annotations

import argparse
import configparser
import json
import shutil
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.cli import main
from fallback.commands.context import Context
from fallback.commands.reconcile import select_mailboxes
from fallback.config import Settings
from fallback.mailbox import record
from fallback.mailbox.aliases import LDAP, MANUAL, VIRTUAL, Aliases, make_alias
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets
from fallback.mailbox.provision import Provisioner
from fallback.mailbox.sync import sync
from tests.conftest import cached_hash
from tests.servers import ROOT
from tests.webutil import log_in_as, make_app, put_message, simple

HASH = cached_hash("secret", "SHA512-CRYPT")
OTHER = cached_hash("changed", "SHA512-CRYPT")


def run(capsys: pytest.CaptureFixture[str], redis_url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis-url", redis_url])
    out, err = capsys.readouterr()
    return code, out, err


def users_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("address,password,mailstore\n" + "".join(f"{a},{p},{s}\n" for a, p, s in rows))
    return path


def names(n: int, domain: str = "example.com") -> list[str]:
    return [f"user{i:06d}@{domain}" for i in range(n)]


def directory(r: redis.Redis, settings: Settings) -> Directory:
    return Directory(r, ensure_buckets(r, settings.directory_buckets))


def snapshot(r: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key with its serialized value: equal snapshots mean Redis is unchanged (but for the
    audit log, where a refused sync is recorded)."""
    return {bytes(k): r.dump(k) for k in r.scan_iter(count=10_000)
            if k != keys.AUDIT_STREAM.encode()}


def provision(r: redis.Redis, settings: Settings, addresses: list[str], mailstore: str = "default") -> None:
    directory(r, settings).put_many([(Mailbox(a, mailstore, HASH), None) for a in addresses])


def logged_in(client: Any) -> bool:
    return bool(client.get("/").status_code == 200)


def test_sync_removes_ends_sessions_keeps_mail_and_status_lists_it(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    everyone = ["alice@example.com", "bob@example.com", "carol@example.org", "dave@example.org"]
    provision(r, settings, everyone)
    msg_id = put_message(r, "bob@example.com", simple(to="bob@example.com"))
    client = make_app(settings, r).test_client()
    log_in_as(client, "bob@example.com")
    assert logged_in(client)
    src = users_csv(tmp_path / "users.csv", [(a, HASH, "default") for a in everyone if a != "bob@example.com"]
                    + [("erin@example.com", HASH, "default")])
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--max-remove", "1")
    assert code == 0, err
    assert "added (1): erin@example.com" in out
    assert "removed (1): bob@example.com" in out
    assert "kept mail (1) (removed, mail kept until reconcile --all and purge): bob@example.com" in out
    assert "ended 1 webmail session(s) of removed mailboxes" in out
    d = directory(r, settings)
    assert d.get("bob@example.com") is None and d.get("erin@example.com") is not None
    assert d.count() == 4 and d.domains() == {"example.com": 2, "example.org": 2}
    # Kept: the message itself, its index and its reconcile state.
    kept = record.read_raw(r, keys.message("bob@example.com", msg_id))
    assert kept == simple(to="bob@example.com")
    assert r.sismember(keys.pending("bob@example.com"), msg_id)
    assert not logged_in(client)
    code, out, err = run(capsys, redis_url, "status", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["removed_with_mail"] == [
        {"address": "bob@example.com", "mailstore": "default", "messages": 1,
         "bytes": len(simple(to="bob@example.com"))}]
    code, out, err = run(capsys, redis_url, "status")
    assert ("1 mailbox(es) removed from the directory still hold mail, kept until reconcile --all "
            "and purge:\n  bob@example.com (mailstore default): 1 message(s)") in out
    # reconcile --all (and --mailstore) still finds the mailbox the directory no longer names.
    ctx = Context(settings)
    put_message(r, "alice@example.com", simple())
    wanted = select_mailboxes(ctx, argparse.Namespace(users=None, mailstore=None, all=True))
    assert wanted == {"alice@example.com": 1, "bob@example.com": 1}
    by_store = select_mailboxes(ctx, argparse.Namespace(users=None, mailstore="default", all=False))
    assert by_store == wanted
    # Provisioned again: found through the directory, no longer listed as removed.
    users_csv(src, [(a, HASH, "default") for a in everyone])
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--max-remove", "1")
    assert code == 0, err
    assert "added (1): bob@example.com" in out and "removed (1): erin@example.com" in out
    assert r.keys("dir:{r*}:removed") == []
    code, out, _ = run(capsys, redis_url, "status", "--format", "json")
    assert json.loads(out)["removed_with_mail"] == []


def test_a_removed_user_gets_550_over_smtp_and_the_others_still_250(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path, receiver_factory: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, ["alice@example.com", "bob@example.com"])
    receiver = receiver_factory(directory_cache_ttl=0.0)
    src = users_csv(tmp_path / "users.csv", [("alice@example.com", HASH, "default")])
    code, _, err = run(capsys, redis_url, "provision", str(src), "--sync", "--force")
    assert code == 0, err
    for source in ("127.0.0.2", "127.0.0.3"):
        with smtplib.SMTP("127.0.0.1", receiver.port, source_address=(source, 0), timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("ann@remote.test")
            code_bob, text = smtp.rcpt("bob@example.com")
            assert (code_bob, text[:5]) == (550, b"5.1.1"), text
            assert smtp.rcpt("alice@example.com")[0] == 250
            assert smtp.data(simple())[0] == 250
    assert r.zcard(keys.folder("alice@example.com", "INBOX")) == 2
    assert r.zcard(keys.folder("bob@example.com", "INBOX")) == 0


def test_dry_run_prints_everything_and_changes_nothing(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    everyone = names(30)
    provision(r, settings, everyone)
    put_message(r, everyone[0], simple(to=everyone[0]))
    rows = [(a, HASH, "default") for a in everyone[25:]]
    rows[0] = (rows[0][0], OTHER, "default")          # a new password
    rows[1] = (rows[1][0], HASH, "store-b")           # a new mailstore
    rows += [(a, HASH, "default") for a in names(22, "example.net")]
    src = users_csv(tmp_path / "users.csv", rows)
    before = snapshot(r)
    report = tmp_path / "report.json"
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--dry-run",
                         "--report", str(report))
    assert snapshot(r) == before
    assert "synced from " + str(src) + " (dry run: nothing was changed)" in out
    assert "would be changed (2): user000025@example.com, user000026@example.com\n" in out
    assert ("would be added (22): " + ", ".join(names(20, "example.net"))
            + ", ... and 2 more (all in --report FILE.json)") in out
    assert "would be removed (25): user000000@example.com" in out
    assert "kept mail (1) (removed, mail kept until reconcile --all and purge): user000000@example.com" in out
    # A real run would refuse: 25 of 30 is past the default 10 %.
    assert code == 1
    assert err == ("fallback provision: --sync would remove 25 of 30 mailboxes (83.3 %), more than "
                   "--max-remove 10 %; a truncated export? Check the file, or give --force\n")
    data = json.loads(report.read_text())
    assert data["removed"] == everyone[:25] and len(data["added"]) == 22
    assert data["kept_mail"] == [everyone[0]]
    # The same run for real (forced) does what the dry run said.
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--force")
    assert code == 0, err
    d = directory(r, settings)
    assert d.count() == 27 and d.get(everyone[0]) is None
    changed = d.get("user000025@example.com")
    assert changed is not None and changed.password_hash == OTHER
    assert d.mailstores() == {"default": 26, "store-b": 1}


@pytest.mark.parametrize(("limit", "at", "past", "shown"), [
    (None, 2, 3, "10 %"), ("3", 3, 4, "3"), ("15%", 3, 4, "15 %")])
def test_max_remove_at_the_limit_passes_and_one_past_refuses(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], limit: str | None, at: int, past: int, shown: str) -> None:
    everyone = names(20)
    provision(r, settings, everyone)
    flags = [] if limit is None else ["--max-remove", limit]
    src = users_csv(tmp_path / "past.csv", [(a, HASH, "default") for a in everyone[past:]])
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", *flags)
    share = f"{past * 5} %"
    assert (code, out, err) == (1, "", f"fallback provision: --sync would remove {past} of 20 mailboxes "
                                f"({share}), more than --max-remove {shown}; a truncated export? "
                                "Check the file, or give --force\n")
    assert snapshot(r) == before
    audit: Any = r.xrevrange(keys.AUDIT_STREAM, count=1)[0][1]  # type: ignore[index]
    assert audit[b"action"] == b"provision-sync" and audit[b"outcome"].startswith(b"refused: --sync would")
    users_csv(src, [(a, HASH, "default") for a in everyone[at:]])
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", *flags)
    assert code == 0, err
    assert directory(r, settings).count() == 20 - at


def test_force_removes_past_the_limit(settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, names(10))
    src = users_csv(tmp_path / "one.csv", [(names(10)[9], HASH, "default")])
    code, _, err = run(capsys, redis_url, "provision", str(src), "--sync", "--force")
    assert code == 0, err
    d = directory(r, settings)
    assert [m.address for m in d.iter_mailboxes()] == [names(10)[9]]
    assert d.domains() == {"example.com": 1}


def test_an_invalid_line_changes_nothing(settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, names(5))
    src = tmp_path / "broken.csv"
    src.write_text("address,password,mailstore\n" + "".join(f"{a},{HASH},default\n" for a in names(4))
                   + "not-an-address,{PLAIN}x,default\nnew@example.com,{NOPE}x,default\n")
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--force")
    assert code == 1
    assert out.splitlines()[0].startswith(f"{src}:6: ")
    assert out.splitlines()[1].startswith(f"{src}:7: ") and "NOPE" in out.splitlines()[1]
    assert err == ("fallback provision: 2 invalid line(s); nothing was changed "
                   "(a sync needs every line valid)\n")
    assert snapshot(r) == before


@pytest.mark.parametrize(("argv", "message"), [
    (["--sync", "--max-remove", "ten"], "fallback provision: --max-remove: 'ten' is not a number of "
     "mailboxes (e.g. 500) or a percentage of the directory up to 100 (e.g. 5%)\n"),
    (["--sync", "--max-remove", "150%"], "fallback provision: --max-remove: '150%' is not a number of "
     "mailboxes (e.g. 500) or a percentage of the directory up to 100 (e.g. 5%)\n"),
    (["--max-remove", "3"], "fallback provision: --max-remove is only for --sync\n"),
    (["--force"], "fallback provision: --force is only for --sync\n"),
])
def test_bad_sync_flags_get_one_line(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    provision(r, settings, names(3))
    src = users_csv(tmp_path / "u.csv", [])
    before = snapshot(r)
    assert run(capsys, redis_url, "provision", str(src), *argv) == (1, "", message)
    assert snapshot(r) == before


def test_dry_run_without_sync_plans_additions_only(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, names(3))
    src = users_csv(tmp_path / "u.csv", [("new@example.com", HASH, "default")])
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--dry-run")
    assert (code, err) == (0, "")
    assert "would be added (1): new@example.com" in out and "removed" not in out
    assert snapshot(r) == before


def test_sync_function_takes_a_one_shot_iterator(settings: Settings, r: redis.Redis) -> None:
    """What another source (LDAP) hands over: a generator of entries, read once."""
    provision(r, settings, names(4))
    from fallback.mailbox.provision import Entry

    gen = (Entry(n, a, HASH, "default") for n, a in enumerate(names(3), 1))
    report = sync(Provisioner(directory(r, settings)), gen, dry_run=False, max_remove=1, force=False)
    assert (report.added, report.changed, report.removed, report.unchanged) == ([], [], [names(4)[3]], 3)
    assert directory(r, settings).count() == 3


@pytest.mark.slow
def test_sync_against_a_directory_of_100000_with_removals(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    everyone = names(100_000)
    provision(r, settings, everyone)
    gone = everyone[::20]                                    # 5,000 removed (5 %)
    for a in gone[:100]:
        r.hset(keys.info(a), "messages", 1)                  # of which 100 hold mail
    keep = [a for i, a in enumerate(everyone) if i % 20]
    src = users_csv(tmp_path / "big.csv", [(a, HASH, "default") for a in keep]
                    + [(a, HASH, "default") for a in names(1000, "example.net")])
    started = time.perf_counter()
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync")
    took = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nsync of 100,000 (5,000 removed, 1,000 added): {took:.1f} s")
    assert code == 0, err
    assert "│ 1,000 │       0 │   5,000 │    95,000 │       100 │" in out
    d = directory(r, settings)
    assert d.count() == 96_000 and d.domains() == {"example.com": 95_000, "example.net": 1000}
    assert all(v is None for v in d.get_many(gone))
    code, out, _ = run(capsys, redis_url, "status", "--format", "json")
    assert len(json.loads(out)["removed_with_mail"]) == 100


def test_the_sync_timer_runs_a_sync_of_an_existing_service() -> None:
    unit = ROOT / "deploy" / "systemd" / "fallback-provision.timer"
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read_string(unit.read_text())
    assert cp["Timer"]["OnCalendar"] and cp["Timer"]["Persistent"] == "true"
    assert cp["Timer"].get("Unit", "fallback-provision.service") == "fallback-provision.service"
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string((unit.with_suffix(".service")).read_text())
    assert service["Service"]["Type"] == "oneshot"
    assert "--sync" in service["Service"]["ExecStart"].split()
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    problems = [line for line in result.stderr.splitlines()
                if line.strip() and "/opt/fallback/.venv/bin/fallback" not in line]
    assert problems == [], problems


# --- aliases: `provision FILE --format virtual --sync` ---------------------------------------

def alias_store(r: redis.Redis, settings: Settings) -> Aliases:
    return Aliases(r, ensure_buckets(r, settings.directory_buckets))


def stored_aliases(r: redis.Redis, settings: Settings) -> dict[str, tuple[str, ...]]:
    store = alias_store(r, settings)
    return {a: alias.targets for a in store.addresses() if (alias := store.get(a)) is not None}


def alias_names(n: int) -> list[str]:
    return [f"list{i:03d}@example.com" for i in range(n)]


def virtual_file(path: Path, aliases: dict[str, str]) -> Path:
    path.write_text("# exported from the main MTA\n" + "".join(f"{a}  {t}\n" for a, t in aliases.items()))
    return path


def test_alias_sync_adds_changes_removes_and_audits(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    store = alias_store(r, settings)
    store.put_many([make_alias(a, ["x@remote.test"]) for a in alias_names(10)])
    wanted = {a: "x@remote.test" for a in alias_names(10)[1:]}
    wanted[alias_names(10)[1]] = "y@remote.test, z@remote.test"   # targets differ: changed
    wanted["@example.org"] = "catch@remote.test"                   # new catch-all
    src = virtual_file(tmp_path / "virtual", wanted)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--format", "virtual", "--sync",
                         "--max-remove", "1")
    assert (code, err) == (0, "")
    assert f"synced aliases from {src}\n" in out and "kept mail" not in out
    assert "added (1): @example.org\n" in out
    assert "changed (1): list001@example.com\n" in out
    assert "removed (1): list000@example.com\n" in out
    expected = {a: tuple(t.replace(",", " ").split()) for a, t in wanted.items()}
    assert stored_aliases(r, settings) == expected
    assert alias_store(r, settings).domains() == {"example.com": 9, "example.org": 1}
    entry: Any = r.xrevrange(keys.AUDIT_STREAM, count=1)[0][1]  # type: ignore[index]
    assert entry[b"action"] == b"provision-sync" and entry[b"outcome"] == b"ok"
    assert json.loads(entry[b"args"]) == {"source": str(src), "kind": "aliases", "added": 1,
                                          "changed": 1, "removed": 1, "kept_mail": 0}
    # Auto-detected format, re-run: nothing to do.
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync")
    assert (code, err) == (0, "") and "added" not in out.split("\n", 3)[-1]
    assert stored_aliases(r, settings) == expected


@pytest.mark.parametrize(("flags", "at", "past", "shown"), [
    (["--max-remove", "3"], 3, 4, "3"), ([], 2, 3, "10 %")])
def test_alias_sync_at_the_removal_limit_passes_and_one_past_refuses(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], flags: list[str], at: int, past: int, shown: str) -> None:
    everyone = alias_names(20)
    alias_store(r, settings).put_many([make_alias(a, ["x@remote.test"]) for a in everyone])
    provision(r, settings, names(100))  # the limit counts aliases, not mailboxes
    src = virtual_file(tmp_path / "virtual", {a: "x@remote.test" for a in everyone[past:]})
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", *flags)
    assert (code, out, err) == (1, "", "fallback provision: --sync would remove "
                                f"{past} of 20 aliases from virtual files ({past * 5} %), more than "
                                f"--max-remove {shown}; a truncated export? Check the file, or give "
                                "--force\n")
    assert snapshot(r) == before
    entry: Any = r.xrevrange(keys.AUDIT_STREAM, count=1)[0][1]  # type: ignore[index]
    assert entry[b"outcome"].startswith(b"refused: --sync would remove")
    virtual_file(src, {a: "x@remote.test" for a in everyone[at:]})
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", *flags)
    assert (code, err) == (0, "")
    assert sorted(stored_aliases(r, settings)) == everyone[at:]
    # Emptying the aliases takes --allow-empty (--force alone is refused: see the empty-source tests).
    code, _, err = run(capsys, redis_url, "provision", str(virtual_file(src, {})), "--format", "virtual",
                       "--sync", "--allow-empty")
    assert (code, err) == (0, "") and stored_aliases(r, settings) == {}
    assert directory(r, settings).count() == 100
    assert alias_store(r, settings).domains() == {}


def test_alias_dry_run_prints_and_changes_nothing(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    alias_store(r, settings).put_many([make_alias(a, ["x@remote.test"]) for a in alias_names(4)])
    src = virtual_file(tmp_path / "virtual", {alias_names(4)[0]: "y@remote.test",
                                              "new@example.com": "x@remote.test"})
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--dry-run")
    assert snapshot(r) == before
    assert code == 1
    assert f"synced aliases from {src} (dry run: nothing was changed)\n" in out
    assert "would be added (1): new@example.com\n" in out
    assert "would be changed (1): list000@example.com\n" in out
    assert "would be removed (3): list001@example.com, list002@example.com, list003@example.com\n" in out
    assert err == ("fallback provision: --sync would remove 3 of 4 aliases from virtual files (75 %), "
                   "more than --max-remove 10 %; a truncated export? Check the file, or give --force\n")


def test_alias_sync_with_an_invalid_line_changes_nothing(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    alias_store(r, settings).put_many([make_alias(a, ["x@remote.test"]) for a in alias_names(3)])
    src = tmp_path / "virtual"
    src.write_text("list000@example.com  x@remote.test\n"
                   "loop-a@example.com  loop-b@example.com\n"
                   "loop-b@example.com  loop-a@example.com\n"
                   "nobody  x@remote.test\n")
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--force")
    assert code == 1
    assert out == (f"{src}:2: alias loop: loop-a@example.com (line 2) -> loop-b@example.com (line 3) "
                   "-> loop-a@example.com\n"
                   f"{src}:3: alias loop: loop-b@example.com (line 3) -> loop-a@example.com (line 2) "
                   "-> loop-b@example.com\n"
                   f"{src}:4: 'nobody' has no @domain: write user@domain, or @domain for a catch-all "
                   "(Postfix matches a bare user only in $myorigin's domains)\n")
    assert err == ("fallback provision: 3 invalid line(s); nothing was changed "
                   "(a sync needs every line valid)\n")
    assert snapshot(r) == before


def test_alias_sync_checks_chains_among_the_file_only(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Stored b -> a; the file drops b and points a at b's address: no loop once synced.
    alias_store(r, settings).put_many([make_alias("b@example.com", ["a@example.com"]),
                                       make_alias("a@example.com", ["x@remote.test"])])
    src = virtual_file(tmp_path / "virtual", {"a@example.com": "b@example.com",
                                              "b@example.com": "x@remote.test"})
    code, _, err = run(capsys, redis_url, "provision", str(src), "--sync")
    assert (code, err) == (0, "")
    assert stored_aliases(r, settings) == {"a@example.com": ("b@example.com",),
                                           "b@example.com": ("x@remote.test",)}


def test_virtual_sync_keeps_ldap_and_manual_aliases_and_counts_its_own_against_the_limit(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    store = alias_store(r, settings)
    virtual_ones = alias_names(10)
    ldap_ones = [f"ldap{i:02d}@example.com" for i in range(20)]
    store.put_many([make_alias(a, ["x@remote.test"]) for a in virtual_ones])
    store.put_many([make_alias(a, ["alice@example.com"], LDAP) for a in ldap_ones])
    assert main(["alias", "add", "hand@example.com", "bob@example.com", "--redis-url", redis_url]) == 0
    capsys.readouterr()
    # 2 of the 10 virtual-file aliases gone: 20 %, past 10 % (of all 31 aliases it would be 6.5 %).
    wanted = {a: "x@remote.test" for a in virtual_ones[2:]}
    src = virtual_file(tmp_path / "virtual", wanted)
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync")
    assert (code, out, err) == (1, "", "fallback provision: --sync would remove 2 of 10 aliases from "
                                "virtual files (20 %), more than --max-remove 10 %; a truncated export? "
                                "Check the file, or give --force\n")
    assert snapshot(r) == before
    # 1 of 10 is at the limit; the file also names an LDAP alias, which it takes over.
    wanted = {a: "x@remote.test" for a in virtual_ones[1:]}
    wanted[ldap_ones[0]] = "y@remote.test"
    code, out, err = run(capsys, redis_url, "provision", str(virtual_file(src, wanted)), "--sync")
    assert (code, err) == (0, "")
    assert "removed (1): list000@example.com\n" in out
    assert f"changed (1): {ldap_ones[0]}\n" in out
    origins = {a.address: a.origin for a in store.entries()}
    assert origins == {**{a: VIRTUAL for a in virtual_ones[1:]}, ldap_ones[0]: VIRTUAL,
                       **{a: LDAP for a in ldap_ones[1:]}, "hand@example.com": MANUAL}
    # An empty file (--allow-empty) removes every virtual-file alias and nothing else.
    code, out, err = run(capsys, redis_url, "provision", str(virtual_file(src, {})), "--format", "virtual",
                         "--sync", "--allow-empty")
    assert (code, err) == (0, "")
    assert {a.address: a.origin for a in store.entries()} == {
        **{a: LDAP for a in ldap_ones[1:]}, "hand@example.com": MANUAL}
    assert stored_aliases(r, settings)["hand@example.com"] == ("bob@example.com",)


# --- a source with no entries at all -----------------------------------------------------------

@pytest.mark.parametrize(("name", "text", "fmt"), [
    ("header-only.csv", "address,password,mailstore\n", []),
    ("comments.passwd", "# exported by the main system\n\n   \n# nothing else\n", ["--format", "passwd"]),
    ("empty.csv", "", ["--format", "csv"]),
])
def test_sync_of_an_empty_source_is_refused_even_with_force(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], name: str, text: str, fmt: list[str]) -> None:
    provision(r, settings, names(3))
    src = tmp_path / name
    src.write_text(text)
    before = snapshot(r)
    message = (f"fallback provision: {src} has no entries; refusing to empty the directory (3 mailboxes), "
               "even with --force: give --allow-empty if that is what you want\n")
    for flags in (["--force"], ["--max-remove", "100%"], []):
        code, out, err = run(capsys, redis_url, "provision", str(src), *fmt, "--sync", *flags)
        assert (code, out, err) == (1, "", message)
        assert snapshot(r) == before
    # A dry run says so and changes nothing either.
    code, out, err = run(capsys, redis_url, "provision", str(src), *fmt, "--sync", "--dry-run")
    assert (code, err) == (1, message)
    assert "would be removed (3)" in out and snapshot(r) == before
    # The operator who means it: the directory is emptied, nothing else is needed.
    code, out, err = run(capsys, redis_url, "provision", str(src), *fmt, "--sync", "--allow-empty")
    assert (code, err) == (0, ""), out
    assert directory(r, settings).count() == 0


def test_empty_source_rules(settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    src = users_csv(tmp_path / "none.csv", [])
    # Nothing to remove: an empty file into an empty directory is no refusal.
    code, _, err = run(capsys, redis_url, "provision", str(src), "--sync")
    assert (code, err) == (0, "")
    # --allow-empty belongs to --sync, like --force.
    code, out, err = run(capsys, redis_url, "provision", str(src), "--allow-empty")
    assert (code, out, err) == (1, "", "fallback provision: --allow-empty is only for --sync\n")
    # One entry is not an empty source: the usual --max-remove applies (and --force passes it).
    provision(r, settings, names(3))
    one = users_csv(tmp_path / "one.csv", [(names(3)[0], HASH, "default")])
    code, _, err = run(capsys, redis_url, "provision", str(one), "--sync")
    assert code == 1 and "--sync would remove 2 of 3 mailboxes" in err
    code, _, err = run(capsys, redis_url, "provision", str(one), "--sync", "--force")
    assert (code, err) == (0, "") and directory(r, settings).count() == 1


def test_alias_sync_of_an_empty_virtual_file_is_refused_even_with_force(
        settings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings, names(2))
    virtual = tmp_path / "virtual"
    virtual.write_text(f"sales@example.com {names(2)[0]}\ninfo@example.com {names(2)[1]}\n")
    assert run(capsys, redis_url, "provision", str(virtual), "--format", "virtual")[0] == 0
    virtual.write_text("# the export lost its lines\n")
    before = snapshot(r)
    code, out, err = run(capsys, redis_url, "provision", str(virtual), "--format", "virtual", "--sync",
                         "--force")
    assert (code, out, err) == (1, "", f"fallback provision: {virtual} has no entries; refusing to empty the "
                                       "directory (2 aliases from virtual files), even with --force: give "
                                       "--allow-empty if that is what you want\n")
    assert snapshot(r) == before
    code, _, err = run(capsys, redis_url, "provision", str(virtual), "--format", "virtual", "--sync",
                       "--allow-empty")
    assert (code, err) == (0, "")
    assert Aliases(r, ensure_buckets(r, settings.directory_buckets)).count() == 0
    assert directory(r, settings).count() == 2  # the mailboxes are another sync's


@pytest.mark.dovecot
def test_a_removed_mailbox_is_reconciled_into_dovecot_by_all(
        settings: Settings, r: redis.Redis, redis_url: str, mailboxes: list[str], dovecot: Any,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14: mail of a user removed by --sync is kept, and `reconcile --all` puts it into the
    real main store (a Dovecot) and counts it in its report; then purge frees it."""
    from tests.dovecot import MainStoreView
    from tests.reconcile_helpers import cli_args, message, put, read_report, reconcile_settings

    bob = "bob@example.com"
    kept = [message(bob, f"kept {n}") for n in range(2)]
    for msg_id, raw in kept:
        put(r, bob, raw, msg_id)
    alice_id, alice_raw = message("alice@example.com", "alice's")
    put(r, "alice@example.com", alice_raw, alice_id)
    src = users_csv(tmp_path / "users.csv", [(a, HASH, "default") for a in mailboxes if a != bob])
    code, out, err = run(capsys, redis_url, "provision", str(src), "--sync", "--max-remove", "1")
    assert code == 0, err
    assert f"kept mail (1) (removed, mail kept until reconcile --all and purge): {bob}" in out
    assert directory(r, settings).get(bob) is None
    s = reconcile_settings(settings, dovecot, tmp_path)
    report_path = tmp_path / "reconcile.json"
    assert main(cli_args(s, "--all", "--report", str(report_path))) == 0, capsys.readouterr().err
    capsys.readouterr()
    report = read_report(report_path)
    assert report["mailboxes"][bob]["appended"] == 2 and report["mailboxes"][bob]["left"] == 0
    assert report["mailboxes"]["alice@example.com"]["appended"] == 1
    assert report["totals"]["appended"] == 3
    view = MainStoreView(dovecot, bob)
    try:
        assert sorted(m["raw"] for m in view.messages("INBOX")) == sorted(raw for _, raw in kept)
    finally:
        view.close()
    # Once reconciled, purge frees the removed mailbox like any other; status stops listing it.
    code, out, err = run(capsys, redis_url, "purge", "--reconciled", "--yes")
    assert code == 0, err
    code, out, err = run(capsys, redis_url, "status", "--format", "json")
    assert code == 0 and json.loads(out)["removed_with_mail"] == []
    # A second --all finds nothing left to append (exactly once).
    report_path.unlink()
    assert main(cli_args(s, "--all", "--report", str(report_path))) == 0
    assert read_report(report_path)["totals"]["appended"] == 0
