"""`fallback provision` and `fallback mailbox`: every scheme, idempotent re-runs, line-exact errors."""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import pty
import re
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from passlib.hash import argon2, bcrypt, sha256_crypt, sha512_crypt

from fallback.cli import main
from fallback.mailbox.directory import Directory, ensure_buckets
from fallback.mailbox.passwords import verify_password
from fallback.mailbox.provision import detect_format

ROOT = Path(__file__).resolve().parent.parent


def ssha(algo: Any, password: str, salt: bytes) -> str:
    return base64.b64encode(algo(password.encode() + salt).digest() + salt).decode()


# One user per scheme: (address, stored password field, plain password).
USERS = [
    ("sha512@example.com", "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw-sha512"), "pw-sha512"),
    ("sha256@example.com", "{SHA256-CRYPT}" + sha256_crypt.using(rounds=5000).hash("pw-sha256"), "pw-sha256"),
    ("blf@example.com", "{BLF-CRYPT}" + bcrypt.using(rounds=4, ident="2y").hash("pw-blf"), "pw-blf"),
    ("a2id@example.com", "{ARGON2ID}" + argon2.using(type="ID", rounds=1, memory_cost=256).hash("pw-a2id"),
     "pw-a2id"),
    ("a2i@example.com", "{ARGON2I}" + argon2.using(type="I", rounds=1, memory_cost=256).hash("pw-a2i"),
     "pw-a2i"),
    ("ssha512@example.org", "{SSHA512}" + ssha(hashlib.sha512, "pw-ssha512", b"salt-of-any-length-!"),
     "pw-ssha512"),
    ("ssha256@example.org", "{SSHA256}" + ssha(hashlib.sha256, "pw-ssha256", b"12"), "pw-ssha256"),
    ("plain@example.org", "{PLAIN}pw-plain-text", "pw-plain-text"),
    ("bare@example.org", "bare-plain-text", "bare-plain-text"),
]


def run(argv: list[str], url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([*argv, "--redis-url", url])
    out, err = capsys.readouterr()
    return rc, out, err


def directory(r: redis.Redis) -> Directory:
    return Directory(r, ensure_buckets(r, 65536))


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """CSV as a spreadsheet writes it: argon2 hashes hold commas, so those fields are quoted."""
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["address", "password", "mailstore"])
        out.writerows(rows)
    return path


def test_csv_every_scheme_verifies_and_plain_is_never_stored(r: redis.Redis, redis_url: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = write_csv(tmp_path / "users.csv", [(a, p, "store-a") for a, p, _ in USERS])
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 0, err
    assert re.search(r"│\s+9\s+│\s+0\s+│\s+0\s+│\s+0\s+│", out), out
    d = directory(r)
    for address, _, plain in USERS:
        mailbox = d.get(address)
        assert mailbox is not None, address
        assert mailbox.mailstore == "store-a"
        assert verify_password(plain, mailbox.password_hash), address
        assert not verify_password(plain + "x", mailbox.password_hash), address
        assert not mailbox.password_hash.startswith("{PLAIN}")
    dump = b"".join(v for key in r.scan_iter("dir:{*}") for v in r.hvals(key))
    assert b"pw-plain-text" not in dump and b"bare-plain-text" not in dump
    assert d.get("plain@example.org").password_hash.startswith("{ARGON2ID}$argon2id$")  # type: ignore[union-attr]
    # Domains we accept mail for come from the addresses.
    assert d.domains() == {"example.com": 5, "example.org": 4}


def test_passwd_file_every_scheme_and_mailstore_extra(r: redis.Redis, redis_url: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["# Dovecot passwd-file", ""]
    # Not the bare plain-text one: a passwd-file hash needs its {SCHEME} (tests/test_passwd_scheme.py).
    for i, (address, stored, _) in enumerate(USERS[:-1]):
        extra = " userdb_mailstore=west" if i % 2 else ""
        lines.append(f"{address}:{stored}:1000:1000::/var/mail/{address}::{extra}".rstrip(":"))
    src = tmp_path / "passwd"
    src.write_text("\n".join(lines) + "\n")
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 0, out + err
    d = directory(r)
    for i, (address, _, plain) in enumerate(USERS[:-1]):
        mailbox = d.get(address)
        assert mailbox is not None and verify_password(plain, mailbox.password_hash), address
        assert mailbox.mailstore == ("west" if i % 2 else "default"), address
    assert d.mailstores() == {"default": 4, "west": 4}


def test_reruns_are_idempotent_and_count_changes(r: redis.Redis, redis_url: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rows = [(a, p, "one") for a, p, _ in USERS]
    src = write_csv(tmp_path / "users.csv", rows)
    assert run(["provision", str(src)], redis_url, capsys)[0] == 0
    before = {a: directory(r).get(a) for a, _, _ in USERS}
    rc, out, _ = run(["provision", str(src)], redis_url, capsys)
    assert rc == 0
    assert re.search(r"│\s+0\s+│\s+0\s+│\s+9\s+│\s+0\s+│", out), out  # plain ones re-verified, kept
    assert {a: directory(r).get(a) for a, _, _ in USERS} == before
    # Change one hash, one mailstore, one plain password; add one line; break one.
    rows[0] = (rows[0][0], USERS[1][1], "one")
    rows[2] = (rows[2][0], rows[2][1], "two")
    rows[7] = (rows[7][0], "{PLAIN}a-new-password", "one")
    rows.append(("new@example.net", "{PLAIN}new", "one"))
    rows.append(("broken@example.net", "{MD5-NOPE}abc", "one"))
    write_csv(src, rows)
    rc, out, _ = run(["provision", str(src)], redis_url, capsys)
    assert rc == 1
    assert re.search(r"│\s+1\s+│\s+3\s+│\s+6\s+│\s+1\s+│", out), out
    d = directory(r)
    assert verify_password("a-new-password", d.get("plain@example.org").password_hash)  # type: ignore[union-attr]
    assert d.get("blf@example.com").mailstore == "two"  # type: ignore[union-attr]
    assert d.mailstores() == {"one": 9, "two": 1}
    assert d.domains()["example.net"] == 1


def test_bad_lines_are_reported_by_number_and_the_rest_loads(r: redis.Redis, redis_url: str,
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    good = USERS[0][1]
    src = tmp_path / "users.csv"
    src.write_bytes("\n".join([
        "address,password,mailstore",
        f"ok1@example.com,{good},default",                   # 2
        f'"broken@example.com,{good},default',               # 3: unterminated quote
        f"too@example.com,{good},default,extra",             # 4: too many fields
        "scheme@example.com,{MD5-NOPE}abcdef,default",       # 5: unknown scheme
        f"ok1@example.com,{good},default",                   # 6: duplicate
        f"not-an-address,{good},default",                    # 7
        "bad@example.com,{SHA512-CRYPT}$6$garbage,default",  # 8: malformed hash
        f"ok2@example.com,{good},bad/store",                 # 9: bad mailstore
        f"OK3@Example.COM,{good},default",                   # 10
        "empty@example.com,,default",                        # 11: empty password
    ]).encode() + b"\n" + b"latin1@example.com,\xe9t\xe9,default\n")  # 12: not UTF-8
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 1
    reasons = dict(re.findall(rf"{re.escape(str(src))}:(\d+): (.*)", out))
    assert set(reasons) == {"3", "4", "5", "6", "7", "8", "9", "11", "12"}, out
    assert "broken CSV" in reasons["3"] and "broken CSV" in reasons["4"]
    assert "unknown password scheme {MD5-NOPE}" in reasons["5"]
    assert "duplicate address ok1@example.com (first on line 2)" in reasons["6"]
    assert "not an email address" in reasons["7"]
    assert "malformed {SHA512-CRYPT} hash" in reasons["8"]
    assert "mailstore" in reasons["9"] and "empty password" in reasons["11"]
    assert "UTF-8" in reasons["12"]
    assert "9 invalid line(s); the other lines were loaded" in err
    d = directory(r)
    assert d.get("ok1@example.com") is not None and d.get("ok3@example.com") is not None
    assert d.count() == 2


def test_strict_loads_nothing(r: redis.Redis, redis_url: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    src = write_csv(tmp_path / "u.csv", [("a@example.com", USERS[0][1], "default"),
                                         ("b@example.com", "{NOPE}x", "default"),
                                         ("a@example.com", USERS[1][1], "default")])
    rc, out, err = run(["provision", str(src), "--strict"], redis_url, capsys)
    assert rc == 1
    assert "u.csv:3: unknown password scheme {NOPE}" in out
    assert "u.csv:4: duplicate address a@example.com (first on line 2)" in out
    assert "nothing was loaded (--strict)" in err
    assert directory(r).count() == 0 and directory(r).get("a@example.com") is None
    # The same file without the bad lines loads under --strict.
    write_csv(src, [("a@example.com", USERS[0][1], "default")])
    assert run(["provision", str(src), "--strict"], redis_url, capsys)[0] == 0
    assert directory(r).count() == 1


def test_format_is_guessed_or_given(r: redis.Redis, redis_url: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert detect_format("\ufeffAddress, Password, Mailstore") == "csv"
    assert detect_format("u@example.com:{PLAIN}x::") == "passwd"
    odd = tmp_path / "odd.txt"
    odd.write_text("hello world\n")
    rc, _, err = run(["provision", str(odd)], redis_url, capsys)
    assert rc == 1 and "cannot tell the file format" in err and "--format" in err
    passwd = tmp_path / "p"
    passwd.write_text(f"x@example.com:{USERS[0][1]}\n")
    assert run(["provision", str(passwd), "--format", "passwd"], redis_url, capsys)[0] == 0
    rc, _, err = run(["provision", str(passwd), "--format", "csv"], redis_url, capsys)
    assert rc == 1 and "line 1: CSV header must be 'address,password,mailstore'" in err
    rc, _, err = run(["provision", str(tmp_path / "missing.csv")], redis_url, capsys)
    assert rc == 1 and "no such file" in err
    assert "Traceback" not in err


def _provision_subprocess(src: Path, url: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "fallback", "provision", str(src), "--redis-url", url],
                          cwd=ROOT, timeout=120, check=False, **kw)


def test_progress_bar_only_on_a_terminal(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    h = USERS[0][1]
    src = write_csv(tmp_path / "u.csv", [(f"user{i}@example.com", h, "default") for i in range(20000)])
    piped = _provision_subprocess(src, redis_url, capture_output=True)
    assert piped.returncode == 0, piped.stderr
    assert b"provisioning" not in piped.stderr and b"\x1b[" not in piped.stderr
    r.flushall()
    leader, follower = pty.openpty()
    tty = _provision_subprocess(src, redis_url, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    try:
        while chunk := os.read(leader, 65536):
            seen += chunk
    except OSError:
        pass
    os.close(leader)
    assert tty.returncode == 0
    assert b"provisioning" in seen


def test_mailbox_add_show_remove(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch, receiver_factory: Any) -> None:
    rc, out, err = run(["mailbox", "add", "Dave@Example.NET", "--password-hash", USERS[2][1],
                        "--mailstore", "east"], redis_url, capsys)
    assert rc == 0 and "added dave@example.net (mailstore east)" in out
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("typed-secret\n"))
    rc, out, _ = run(["mailbox", "add", "erin@example.net", "--password-stdin"], redis_url, capsys)
    assert rc == 0 and "added erin@example.net" in out
    stored = directory(r).get("erin@example.net").password_hash  # type: ignore[union-attr]
    assert stored.startswith("{ARGON2ID}") and verify_password("typed-secret", stored)
    rc, out, _ = run(["mailbox", "show", "dave@example.net"], redis_url, capsys)
    assert rc == 0 and "mailstore:  east" in out and "{BLF-CRYPT} hash" in out
    assert USERS[2][1][12:] not in out  # the hash itself is not shown

    # The new domain is accepted at RCPT; its unknown users are not; others' domains are foreign.
    # (No lookup cache here: a removal must show at the very next RCPT in this test; in
    # production it shows within directory_cache_ttl seconds.)
    rt = receiver_factory(directory_cache_ttl=0.0)
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
        smtp.ehlo("x")
        smtp.mail("s@remote.test")
        assert smtp.rcpt("dave@example.net")[0] == 250
        assert smtp.rcpt("nobody@example.net")[0] == 550
        smtp.data(b"Subject: hi\r\n\r\nx\r\n")
    rc, _, err = run(["mailbox", "remove", "dave@example.net"], redis_url, capsys)
    assert rc == 1 and "holds 1 message(s)" in err and "--force" in err
    rc, out, _ = run(["mailbox", "remove", "dave@example.net", "--force"], redis_url, capsys)
    assert rc == 0 and "removed dave@example.net (1 message(s) kept in Redis)" in out
    assert run(["mailbox", "remove", "erin@example.net"], redis_url, capsys)[0] == 0
    assert directory(r).domains() == {}
    with smtplib.SMTP("127.0.0.1", rt.port) as smtp:
        smtp.ehlo("x")
        smtp.mail("s@remote.test")
        code, msg = smtp.rcpt("dave@example.net")
        assert (code, msg[:5]) == (550, b"5.7.1")
    rc, _, err = run(["mailbox", "show", "dave@example.net"], redis_url, capsys)
    assert rc == 1 and "dave@example.net is not provisioned" in err
    rc, _, err = run(["mailbox", "add", "x@example.com", "--password-hash", "{NOPE}x"], redis_url, capsys)
    assert rc == 1 and "unknown password scheme" in err
