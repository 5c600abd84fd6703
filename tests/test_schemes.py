"""Every password scheme a Dovecot passdb commonly holds logs in: hashes made by Dovecot's own
`doveadm pw` at test time, fixed vectors for what doveadm does not make here, line-exact
refusals of unknown schemes, and a webmail log-in (real Redis, real `fallback provision`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fallback.errors import InputError
from fallback.mailbox import passwords
from fallback.mailbox.passwords import check_stored, verify_password
from tests.test_provision import directory, run, write_csv
from tests.webutil import csrf, make_app

DOVEADM = shutil.which("doveadm")
needs_doveadm = pytest.mark.skipif(DOVEADM is None, reason="doveadm (dovecot-core) is not installed")
# Non-ASCII on purpose; the wrong one differs within DES crypt's first 8 characters.
RIGHT = "Correct horse ü 9"
WRONG = "correct horse ü 9"
# The schemes of the issue, Dovecot's aliases of them, and the encodings doveadm writes.
DOVEADM_SCHEMES = [
    "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID", "MD5-CRYPT", "SSHA",
    "SSHA256", "SSHA512", "SHA", "CRYPT", "PBKDF2", "DES-CRYPT", "SHA1", "SHA256", "SHA512",
    "SMD5", "PLAIN-MD5", "LDAP-MD5",
    "SHA.HEX", "SSHA.HEX", "SHA.B64", "SSHA256.HEX", "SSHA512.HEX", "SHA256.HEX", "SHA512.B64",
    "PBKDF2.HEX", "SHA512-CRYPT.HEX", "MD5-CRYPT.B64",
]
KNOWN = ("SHA512-CRYPT, SHA256-CRYPT, BLF-CRYPT, ARGON2ID, ARGON2I, MD5-CRYPT, DES-CRYPT, CRYPT, "
         "PBKDF2, SSHA512, SSHA256, SSHA, SMD5, SHA512, SHA256, SHA, SHA1, PLAIN-MD5, LDAP-MD5, PLAIN")


def doveadm_pw(scheme: str, password: str = RIGHT) -> str:
    assert DOVEADM is not None
    done = subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", password], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip()


@needs_doveadm
@pytest.mark.parametrize("scheme", DOVEADM_SCHEMES)
def test_a_hash_dovecot_made_verifies(scheme: str) -> None:
    stored = doveadm_pw(scheme)
    assert stored.startswith("{" + scheme + "}")
    assert check_stored(stored) == stored  # kept exactly as Dovecot wrote it
    assert verify_password(RIGHT, stored)
    assert not verify_password(WRONG, stored)
    assert not verify_password("", stored)


# Fixed vectors of the password "secret", for what doveadm does not make here: {CRYPT} is
# whatever crypt(3) verifies (doveadm writes bcrypt), salts of other lengths than Dovecot's 4
# bytes (slappasswd, other tools), and digests written in hex without a suffix.
SECRET_VECTORS = [
    "{CRYPT}imKaSgwybA4pc",                                       # DES, as /etc/shadow once held
    "{CRYPT}$1$Z4fyBMU0$klcE3TYzXyTac26d2Nfbw/",                  # MD5-crypt under {CRYPT}
    "{CRYPT}$5$TiOOYjINhKG2p/aZ$cMKIqoXk/spadMqTwBxD8OB0ztZWYTU/tGnrKEakoCA",
    "{CRYPT}$6$JOfpf6.nsqiweNne$nZwArCa3p3GUeU6RclR.InVLW511qxjEtriI539MW6.bCIgPsoWniuhxKiX"
    "/OwqmhEGtisFsO5peOSR3pxJLg1",
    "{CRYPT}$2y$05$k4HnbLR8ScIeBmZEn5QwuO6HQw/r6fOmS63FRlHFBhIQRh9CHJObi",
    "{PBKDF2}$1$Zq5O7Eol9aUf15c2$5000$652a0d57fcf9f2620d91e22279c67247cd238553",
    "{PBKDF2}$1$Zq5O7Eol9aUf15c2$5000$652A0D57FCF9F2620D91E22279C67247CD238553",
    "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",                          # SHA-1 of "secret"
    "{SHA}e5e9fa1ba31ecd1ae84f75caaa474f3a663f05f4",               # the same in hex, no suffix
    "{SHA256}2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
    "{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69",
    "{SSHA}zhdU4q5SIj4Qp3Ht30RW9MocfTI1yprX",                     # 4-byte salt (Dovecot)
    "{SSHA}GTyI0TiLF1J1q2d+FF0hJjxHzhbqGfVD",                     # OpenLDAP's slappasswd
    "{SSHA}qxCNMAYjMvleLTy1r4fG7qhbtaI4Ynl0ZXNhbA==",             # 8-byte salt
    "{SSHA}M4EnVA3MvkhYmg/zCHVUj8JMdMhhYmM=",                     # 3-byte salt
    "{SSHA512}rnX2jf5aM3E9K0csZ35u/tEUKwEFTL3t33IqiNo9ERub7/YfIpltMWyKVNlq98Zip5Epf51+bdNCxLCbe"
    "rKRu18YQHY=",
    "{SMD5}R5EvcRyCrmzzJqxrH0dTTY6330A=",
]


@pytest.mark.parametrize("stored", SECRET_VECTORS)
def test_known_vectors_verify(stored: str) -> None:
    assert check_stored(stored) == stored
    assert verify_password("secret", stored)
    assert not verify_password("Secret", stored) and not verify_password("public", stored)


@pytest.mark.parametrize(("stored", "reason"), [
    ("{MD4}abc", f"unknown password scheme {{MD4}} (known: {KNOWN})"),
    ("{SHA.B32}5en6G6MezRroT3XKqkdPOmY/BfQ=", f"unknown password scheme {{SHA.B32}} (known: {KNOWN})"),
    ("{SHA.HEX}5en6G6MezRroT3XKqkdPOmY/BfQ=", "malformed {SHA.HEX} hash (not hex)"),
    ("{SHA}5en6G6MezRroT3XKqkdPOmY", "malformed {SHA} hash (not base64)"),
    ("{SHA}5en6G6MezRroT3XKqkdPOmY/", "malformed {SHA} hash (18 bytes, not 20)"),
    ("{SHA256}5en6G6MezRroT3XKqkdPOmY/BfQ=", "malformed {SHA256} hash (20 bytes, not 32)"),
    ("{SSHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", "malformed {SSHA} hash (no salt)"),
    ("{PBKDF2}$1$Zq5O7Eol9aUf15c2$5000$652a0d57", "malformed {PBKDF2} hash"),
    ("{PBKDF2}$1$Zq5O7Eol9aUf15c2$0$652a0d57fcf9f2620d91e22279c67247cd238553", "malformed {PBKDF2} hash"),
    ("{CRYPT}not a crypt hash", "malformed {CRYPT} hash"),
    # yescrypt of "secret" (libxcrypt): no hashing library here verifies it.
    ("{CRYPT}$y$j9T$F5Jx5fExrKuPp53xLKQ..1$GmcwIgvdUC9qLWcKCi6gklUa1dM3ziD43YxYNURLKy0",
     "malformed {CRYPT} hash"),
    ("{DES-CRYPT}$1$Z4fyBMU0$klcE3TYzXyTac26d2Nfbw/", "malformed {DES-CRYPT} hash"),
    ("{MD5-CRYPT}$1$Z4fyBMU0$short", "malformed {MD5-CRYPT} hash"),
    ("{SHA512-CRYPT.HEX}24362467", "malformed {SHA512-CRYPT.HEX} hash"),
])
def test_bad_hashes_are_refused_with_their_reason(stored: str, reason: str) -> None:
    with pytest.raises(InputError) as info:
        check_stored(stored)
    assert info.value.reason == reason
    assert not verify_password("secret", stored)


def test_a_prefixless_md5_crypt_or_pbkdf2_in_a_csv_is_not_hashed_as_text() -> None:
    for bare, scheme in (("$1$Z4fyBMU0$klcE3TYzXyTac26d2Nfbw/", "MD5-CRYPT"),
                         ("$1$Zq5O7Eol9aUf15c2$5000$652a0d57fcf9f2620d91e22279c67247cd238553", "PBKDF2")):
        with pytest.raises(InputError) as info:
            passwords.plain_text(bare)
        assert info.value.reason == (
            f"the password looks like a {scheme} hash without its {{SCHEME}} prefix; write "
            f"{{{scheme}}} before the hash (or {{PLAIN}} before the text, if that really is the password)")
    # A 13-character password is not taken for a DES hash.
    assert passwords.plain_text("imKaSgwybA4pc") == "imKaSgwybA4pc"


@needs_doveadm
def test_passwd_file_of_dovecot_hashes_imports_and_logs_in(r, redis_url, tmp_path, capsys) -> None:
    """One user per scheme in a Dovecot passwd-file, imported by `fallback provision`;
    {PLAIN} (doveadm's too) is hashed on import and never stored."""
    schemes = [*DOVEADM_SCHEMES, "PLAIN"]
    users = {f"u{i}@example.com": doveadm_pw(s) for i, s in enumerate(schemes)}
    src = tmp_path / "users"
    src.write_text("".join(f"{u}:{h}:1000:1000::/home/u::\n" for u, h in users.items()))
    rc, out, err = run(["provision", "--format", "passwd", str(src)], redis_url, capsys)
    assert rc == 0, out + err
    d = directory(r)
    assert d.count() == len(schemes)
    for user, given in users.items():
        stored = d.get(user).password_hash
        if given.startswith("{PLAIN}"):
            assert "Correct horse" not in stored and stored.startswith("{ARGON2ID}")
        else:
            assert stored == given
        assert verify_password(RIGHT, stored) and not verify_password(WRONG, stored), given


def test_unknown_scheme_in_a_passwd_file_names_its_line(r, redis_url, tmp_path, capsys) -> None:
    src = tmp_path / "users.passwd"
    src.write_text("# exported from the main passdb\n"
                   "ann@example.com:{CRYPT}imKaSgwybA4pc:1000:1000::/home/ann::\n"
                   "bob@example.com:{MD4}8a9d093f14f8701df17732b2bb182c74:1000:1000::/home/bob::\n"
                   "cid@example.com:{SHA.B32}5en6G6MezRroT3XKqkdPOmY/BfQ=::\n"
                   "dee@example.com:{PBKDF2}$1$Zq5O7Eol9aUf15c2$5000$652a0d57fcf9f2620d91e22279c67247cd238553::\n")
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 1
    errors = [line for line in out.splitlines() if line.startswith(f"{src}:")]
    assert errors == [f"{src}:3: unknown password scheme {{MD4}} (known: {KNOWN})",
                      f"{src}:4: unknown password scheme {{SHA.B32}} (known: {KNOWN})"]
    assert "fallback provision: 2 invalid line(s); the other lines were loaded" in err
    d = directory(r)
    assert d.get("bob@example.com") is None and d.get("cid@example.com") is None
    assert verify_password("secret", d.get("ann@example.com").password_hash)
    assert verify_password("secret", d.get("dee@example.com").password_hash)
    assert d.count() == 2


def test_unknown_scheme_in_a_csv_names_its_line_and_strict_loads_nothing(r, redis_url, tmp_path,
                                                                          capsys) -> None:
    src = write_csv(tmp_path / "users.csv", [
        ("eve@example.com", "{SSHA}zhdU4q5SIj4Qp3Ht30RW9MocfTI1yprX", "default"),
        ("fay@example.com", "{NTLM}8a9d093f14f8701df17732b2bb182c74", "default"),
    ])
    rc, out, err = run(["provision", "--strict", str(src)], redis_url, capsys)
    assert rc == 1
    assert f"{src}:3: unknown password scheme {{NTLM}} (known: {KNOWN})" in out.splitlines()
    assert "nothing was loaded (--strict)" in err
    assert directory(r).count() == 0
    rc, out, err = run(["provision", str(src)], redis_url, capsys)
    assert rc == 1 and f"{src}:3: unknown password scheme {{NTLM}} (known: {KNOWN})" in out.splitlines()
    d = directory(r)
    assert verify_password("secret", d.get("eve@example.com").password_hash)
    assert d.get("fay@example.com") is None and d.count() == 1


def test_default_scheme_crypt_reads_bare_des_and_md5_hashes(r, redis_url, tmp_path, capsys) -> None:
    """Old passwd-files rely on Dovecot's default_pass_scheme = CRYPT."""
    src = tmp_path / "old.passwd"
    src.write_text("gus@example.com:imKaSgwybA4pc::\n"
                   "hal@example.com:$1$Z4fyBMU0$klcE3TYzXyTac26d2Nfbw/::\n"
                   "ian@example.com:not-a-hash::\n")
    rc, out, _ = run(["provision", "--default-scheme", "crypt", str(src)], redis_url, capsys)
    assert rc == 1
    assert [line for line in out.splitlines() if line.startswith(f"{src}:")] == [
        f"{src}:3: the password of ian@example.com does not look like a CRYPT hash (--default-scheme CRYPT)"]
    d = directory(r)
    assert d.get("gus@example.com").password_hash == "{CRYPT}imKaSgwybA4pc"
    assert verify_password("secret", d.get("hal@example.com").password_hash)
    assert d.get("ian@example.com") is None


def _login(client, username: str, password: str):
    page = client.get("/login", environ_base={"REMOTE_ADDR": "10.0.0.9"})
    return client.post("/login", data={"username": username, "password": password,
                                       "csrf_token": csrf(page.text)},
                       environ_base={"REMOTE_ADDR": "10.0.0.9"})


@pytest.mark.parametrize("stored", [
    "{PBKDF2}$1$Zq5O7Eol9aUf15c2$5000$652a0d57fcf9f2620d91e22279c67247cd238553",
    "{CRYPT}imKaSgwybA4pc",
    "{SSHA}zhdU4q5SIj4Qp3Ht30RW9MocfTI1yprX",
])
def test_webmail_login_with_an_imported_hash(r, redis_url, settings, tmp_path, capsys, stored) -> None:
    src = tmp_path / "one.passwd"
    src.write_text(f"jo@example.com:{stored}::\n")
    assert run(["provision", str(src)], redis_url, capsys)[0] == 0
    client = make_app(settings, r).test_client()
    wrong = _login(client, "jo@example.com", "Secret")
    assert wrong.status_code == 401 and "Wrong address or password." in wrong.text
    ok = _login(client, "jo@example.com", "secret")
    assert ok.status_code == 302 and ok.headers["Location"] == "/"
    page = client.get("/")
    assert page.status_code == 200 and "jo@example.com" in page.text
