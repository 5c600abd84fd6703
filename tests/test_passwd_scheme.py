"""Passwd-file hashes without a {SCHEME} prefix: refused with their line number unless
--default-scheme names one (Dovecot's default_pass_scheme), never hashed as plain text
(`fallback provision` on real files and the real Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from passlib.hash import bcrypt, sha512_crypt

from fallback.mailbox.passwords import verify_password
from tests.test_provision import directory, run

SHA512 = sha512_crypt.using(rounds=5000).hash("right horse")
BLF = bcrypt.using(rounds=4, ident="2y").hash("blf pass")
NO_PREFIX = ("the password of {user} has no {{SCHEME}} prefix; give --default-scheme SCHEME "
             "(Dovecot's default_pass_scheme) if the file relies on one")


def passwd(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def lines_of(out: str, src: Path) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{src}:")]


def test_no_prefix_is_refused_with_its_line_number(r, redis_url, tmp_path, capsys) -> None:
    src = passwd(tmp_path / "users.passwd", [
        "# Dovecot passwd-file",
        f"ann@example.com:{{BLF-CRYPT}}{BLF}:1000:1000::/home/ann::",
        "",
        f"bob@example.com:{SHA512}:1000:1000::/home/bob::",
        "cid@example.com:plain-looking-secret::",
        "dee@example.com:*:1000:1000::/home/dee::",  # a disabled account in Dovecot's files
    ])
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 1
    assert lines_of(out, src) == [f"{src}:4: " + NO_PREFIX.format(user="bob@example.com"),
                                  f"{src}:5: " + NO_PREFIX.format(user="cid@example.com"),
                                  f"{src}:6: " + NO_PREFIX.format(user="dee@example.com")]
    assert "fallback provision: 3 invalid line(s); the other lines were loaded" in err
    d = directory(r)
    # The good line is in; the refused ones were not hashed as if they were passwords.
    assert verify_password("blf pass", d.get("ann@example.com").password_hash)
    for user in ("bob@example.com", "cid@example.com", "dee@example.com"):
        assert d.get(user) is None, user


def test_strict_loads_nothing_when_a_prefix_is_missing(r, redis_url, tmp_path, capsys) -> None:
    src = passwd(tmp_path / "strict.passwd", [f"eve@example.com:{{BLF-CRYPT}}{BLF}::",
                                               f"fay@example.com:{SHA512}::"])
    rc, out, err = run(["provision", "--strict", str(src)], redis_url, capsys)
    assert rc == 1 and lines_of(out, src) == [f"{src}:2: " + NO_PREFIX.format(user="fay@example.com")]
    assert "nothing was loaded (--strict)" in err
    assert directory(r).get("eve@example.com") is None


def test_default_scheme_takes_the_hash_as_that_scheme(r, redis_url, tmp_path, capsys) -> None:
    src = passwd(tmp_path / "sha.passwd", [
        f"gus@example.com:{SHA512}:1000:1000::/home/gus::",
        f"hal@example.com:{{BLF-CRYPT}}{BLF}::",  # a prefix still wins over the default
    ])
    rc, out, err = run(["provision", "--default-scheme", "SHA512-CRYPT", str(src)], redis_url, capsys)
    assert rc == 0, out + err
    d = directory(r)
    stored = d.get("gus@example.com").password_hash
    assert stored == "{SHA512-CRYPT}" + SHA512
    assert verify_password("right horse", stored) and not verify_password("wrong horse", stored)
    assert not verify_password(SHA512, stored)  # it was not taken as a plain password
    assert verify_password("blf pass", d.get("hal@example.com").password_hash)
    # A re-run changes nothing; lower case names the same scheme; the environment works too.
    rc, out, _ = run(["provision", "--default-scheme", "sha512-crypt", str(src)], redis_url, capsys)
    assert rc == 0 and d.get("gus@example.com").password_hash == stored


def test_default_scheme_from_the_environment(r, redis_url, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FALLBACK_DEFAULT_SCHEME", "SHA512-CRYPT")
    src = passwd(tmp_path / "env.passwd", [f"ivy@example.com:{SHA512}::"])
    assert run(["provision", str(src)], redis_url, capsys)[0] == 0
    assert verify_password("right horse", directory(r).get("ivy@example.com").password_hash)


def test_a_hash_not_of_the_default_scheme_is_refused(r, redis_url, tmp_path, capsys) -> None:
    src = passwd(tmp_path / "mixed.passwd", [
        f"jon@example.com:{SHA512}::",
        f"kim@example.com:{BLF}::",
        "lea@example.com:just-a-password::",
        f"max@example.com:{SHA512[:-1]}::",
    ])
    rc, out, err = run(["provision", "--default-scheme", "SHA512-CRYPT", str(src)], redis_url, capsys)
    assert rc == 1 and "3 invalid line(s); the other lines were loaded" in err
    wrong = "the password of {} does not look like a SHA512-CRYPT hash (--default-scheme SHA512-CRYPT)"
    assert lines_of(out, src) == [f"{src}:2: " + wrong.format("kim@example.com"),
                                  f"{src}:3: " + wrong.format("lea@example.com"),
                                  f"{src}:4: " + wrong.format("max@example.com")]
    d = directory(r)
    assert verify_password("right horse", d.get("jon@example.com").password_hash)
    assert all(d.get(u) is None for u in ("kim@example.com", "lea@example.com", "max@example.com"))


@pytest.mark.parametrize("name", ["MD5-NOPE", "SHA.HEXX", "sha999", "{PLAIN-MD4}"])
def test_unknown_default_scheme_is_one_line(r, redis_url, tmp_path, capsys, name) -> None:
    src = passwd(tmp_path / "any.passwd", [f"ned@example.com:{SHA512}::"])
    rc, out, err = run(["provision", "--default-scheme", name, str(src)], redis_url, capsys)
    assert rc == 1 and out == ""
    assert err == (f"fallback provision: default_scheme: unknown password scheme {name!r} (known: "
                   "SHA512-CRYPT, SHA256-CRYPT, BLF-CRYPT, ARGON2ID, ARGON2I, MD5-CRYPT, DES-CRYPT, "
                   "CRYPT, PBKDF2, SSHA512, SSHA256, SSHA, SMD5, SHA512, SHA256, SHA, SHA1, PLAIN-MD5, "
                   "LDAP-MD5, PLAIN, CLEARTEXT)\n")
    assert directory(r).get("ned@example.com") is None


def test_plain_text_only_where_marked(r, redis_url, tmp_path, capsys) -> None:
    src = passwd(tmp_path / "plain.passwd", ["oli@example.com:{PLAIN}pw one::",
                                              "pam@example.com:{CLEARTEXT}pw two::",
                                              f"qed@example.com:{{PLAIN}}{SHA512}::"])
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 0, out + err
    d = directory(r)
    assert verify_password("pw one", d.get("oli@example.com").password_hash)
    assert verify_password("pw two", d.get("pam@example.com").password_hash)
    # Marked as plain text, even hash-shaped text is the password.
    assert verify_password(SHA512, d.get("qed@example.com").password_hash)
    for user in ("oli@example.com", "pam@example.com"):
        assert d.get(user).password_hash.startswith("{ARGON2ID}$argon2id$")
    # --default-scheme PLAIN is Dovecot's default_pass_scheme = PLAIN: bare fields are passwords.
    src = passwd(tmp_path / "bare.passwd", ["ray@example.com:bare one::"])
    assert run(["provision", "--default-scheme", "PLAIN", str(src)], redis_url, capsys)[0] == 0
    assert verify_password("bare one", d.get("ray@example.com").password_hash)


def test_csv_plain_text_that_is_a_hash_without_prefix_is_refused(r, redis_url, tmp_path, capsys) -> None:
    src = tmp_path / "users.csv"
    src.write_text("address,password,mailstore\n"
                   "sam@example.com,plain csv password,default\n"
                   f"tom@example.com,{SHA512},default\n"
                   f"uma@example.com,{BLF},default\n")
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 1 and "2 invalid line(s); the other lines were loaded" in err
    looks = ("the password looks like a {0} hash without its {{SCHEME}} prefix; write {{{0}}} before "
             "the hash (or {{PLAIN}} before the text, if that really is the password)")
    assert lines_of(out, src) == [f"{src}:3: " + looks.format("SHA512-CRYPT"),
                                  f"{src}:4: " + looks.format("BLF-CRYPT")]
    d = directory(r)
    assert verify_password("plain csv password", d.get("sam@example.com").password_hash)
    assert d.get("tom@example.com") is None and d.get("uma@example.com") is None
