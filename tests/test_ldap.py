"""`fallback provision --ldap-url`: users from a real slapd, paged, mapped, and each error as one line."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import smtplib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from passlib.hash import sha512_crypt

from fallback.cli import main
from fallback.mailbox import store
from fallback.mailbox.aliases import LDAP, MANUAL, VIRTUAL, Aliases
from fallback.mailbox.directory import Directory, ensure_buckets
from fallback.mailbox.passwords import verify_password
from fallback.ops import failover
from tests.servers import free_port
from tests.slapd import PEOPLE_DN, READER_DN, READER_PASSWORD, SIZE_LIMIT, LdapUser, SlapdServer, ssha
from tests.test_sync import snapshot

pytestmark = pytest.mark.ldap

Factory = Callable[[list[LdapUser]], SlapdServer]
SHA512 = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw-sha512")
CRYPT = "{CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw-crypt")


def ssha512(password: str, salt: bytes = b"0123456789") -> str:
    import base64
    return "{SSHA512}" + base64.b64encode(hashlib.sha512(password.encode() + salt).digest() + salt).decode()


def run(argv: list[str], url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["provision", *argv, "--redis-url", url])
    out, err = capsys.readouterr()
    return rc, out, err


def directory(r: redis.Redis) -> Directory:
    return Directory(r, ensure_buckets(r, 65536))


def reader_args(server: SlapdServer, tmp_path: Path) -> list[str]:
    secret = tmp_path / "ldap-password"
    secret.write_text(READER_PASSWORD + "\n")
    return ["--ldap-url", server.url, "--ldap-base", PEOPLE_DN, "--ldap-bind-dn", READER_DN,
            "--ldap-password-file", str(secret)]


def test_users_with_their_hashes_log_in(slapd_factory: Factory, r: redis.Redis, redis_url: str,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = slapd_factory([
        LdapUser("alice", "Alice@Example.com", ssha("pw-ssha")),
        LdapUser("bob", "bob@example.com", SHA512),
        LdapUser("carol", "carol@example.com", CRYPT),
        LdapUser("dave", "dave@example.com", ssha512("pw-ssha512")),
    ])
    rc, out, err = run(reader_args(server, tmp_path), redis_url, capsys)
    assert (rc, err) == (0, ""), out + err
    d = directory(r)
    for address, plain in (("alice@example.com", "pw-ssha"), ("bob@example.com", "pw-sha512"),
                           ("carol@example.com", "pw-crypt"), ("dave@example.com", "pw-ssha512")):
        box = d.get(address)
        assert box is not None and box.mailstore == "default", address
        assert verify_password(plain, box.password_hash), address
        assert not verify_password("wrong", box.password_hash), address
    assert d.get("bob@example.com").password_hash == SHA512   # kept exactly as LDAP holds it
    # A re-run changes nothing.
    rc, out, _ = run(reader_args(server, tmp_path), redis_url, capsys)
    assert rc == 0 and "(4 entries)" in out
    assert out.split("\n")[-3].split() == ["│", "0", "│", "0", "│", "4", "│", "0", "│", "0", "│"]


def test_more_users_than_the_size_limit_are_read_page_by_page(
        slapd_factory: Factory, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    count = SIZE_LIMIT * 2 + 200
    server = slapd_factory([LdapUser(f"u{i}", f"u{i}@example.com", ssha(f"pw{i}")) for i in range(count)])
    rc, out, err = run(reader_args(server, tmp_path), redis_url, capsys)
    assert (rc, err) == (0, ""), out + err
    assert f"({count} entries)" in out
    d = directory(r)
    assert d.count() == count
    assert verify_password("pw1199", d.get("u1199@example.com").password_hash)


def test_anonymous_search_without_hashes_is_refused_per_entry(
        slapd_factory: Factory, r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    server = slapd_factory([LdapUser("alice", "alice@example.com", ssha("pw"))])
    rc, out, err = run(["--ldap-url", server.url, "--ldap-base", PEOPLE_DN], redis_url, capsys)
    assert rc == 1
    assert (f"uid=alice,{PEOPLE_DN}: no userPassword (the password hash); if the directory has it, "
            "the bind DN may not read it (give --ldap-bind-dn)") in out.splitlines()
    assert err == "fallback provision: 1 invalid LDAP entry; the other entries were loaded\n"
    assert directory(r).count() == 0


def test_filter_map_mailstore_and_aliases(slapd_factory: Factory, r: redis.Redis, redis_url: str,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = slapd_factory([
        LdapUser("alice", "alice@example.com", ssha("pw-a"), mailhost="store2",
                 aliases=["alice@example.com", "sales@example.com", "info@example.com"]),
        LdapUser("bob", "bob@example.com", ssha("pw-b"), aliases=["sales@example.com"]),
        LdapUser("old", "old@example.com", ssha("pw-o"), extra_classes=["extensibleObject"]),
    ])
    args = [*reader_args(server, tmp_path), "--ldap-filter", "(&(mail=*)(!(uid=old)))",
            "--ldap-map", "mailstore=mailHost,alias=mailLocalAddress", "--mailstore", "store1"]
    rc, out, err = run(args, redis_url, capsys)
    assert (rc, err) == (0, ""), out + err
    d = directory(r)
    assert d.get("old@example.com") is None
    assert d.get("alice@example.com").mailstore == "store2"
    assert d.get("bob@example.com").mailstore == "store1"
    aliases = Aliases(r, d.buckets)
    assert aliases.get("sales@example.com").targets == ("alice@example.com", "bob@example.com")
    assert aliases.get("info@example.com").targets == ("alice@example.com",)
    assert aliases.get("alice@example.com") is None


def test_bad_entries_are_named_by_dn_and_the_rest_load(slapd_factory: Factory, r: redis.Redis,
                                                       redis_url: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    server = slapd_factory([
        LdapUser("good", "good@example.com", ssha("pw")),
        LdapUser("bare", "bare@example.com", "no-scheme-here"),
        LdapUser("odd", "odd@example.com", "{NOSUCH}abc"),
        LdapUser("dup", "good@example.com", ssha("pw2")),
    ])
    rc, out, err = run(reader_args(server, tmp_path), redis_url, capsys)
    assert rc == 1
    lines = out.splitlines()
    assert (f"uid=bare,{PEOPLE_DN}: the password of bare@example.com has no {{SCHEME}} prefix; give "
            "--default-scheme SCHEME (Dovecot's default_pass_scheme) if the directory relies on one"
            ) in lines
    odd = f"uid=odd,{PEOPLE_DN}: unknown password scheme {{NOSUCH}}"
    assert any(line.startswith(odd) for line in lines), out
    # A search has no order: whichever of the two comes second is the duplicate.
    dups = [line for line in lines if ": duplicate address good@example.com (also in entry " in line]
    assert len(dups) == 1 and dups[0].split(",")[0] in ("uid=good", "uid=dup"), out
    assert err == "fallback provision: 3 invalid LDAP entries; the other entries were loaded\n"
    d = directory(r)
    assert d.count() == 1 and d.get("good@example.com") is not None
    # --strict: nothing at all.
    r.flushall()
    rc, out, err = run([*reader_args(server, tmp_path), "--strict"], redis_url, capsys)
    assert rc == 1 and err.endswith("nothing was loaded (--strict)\n")
    assert directory(r).count() == 0


def test_unreachable_server_is_one_line(redis_url: str, r: redis.Redis,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"ldap://127.0.0.1:{free_port()}"
    rc, out, err = run(["--ldap-url", url, "--ldap-base", PEOPLE_DN], redis_url, capsys)
    assert (rc, out) == (1, "")
    assert err == f"fallback provision: LDAP {url} unreachable: connection refused\n"
    assert directory(r).count() == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"password": "wrong"}, "LDAP {url}: bind as " + READER_DN + " refused: invalid credentials "
                            "(check --ldap-bind-dn and --ldap-password-file)"),
    ({"base": "ou=nobody,dc=example,dc=com"},
     "LDAP {url}: base DN 'ou=nobody,dc=example,dc=com' does not exist (noSuchObject)"),
    ({"filter": "(mail=*"}, "--ldap-filter: not an LDAP filter: '(mail=*'"),
    ({"password_file": "/nonexistent/secret"}, "--ldap-password-file: cannot read /nonexistent/secret: "
                                                "[Errno 2] No such file or directory: '/nonexistent/secret'"),
    ({"map": "adress=mail"}, "--ldap-map: unknown field 'adress' (known: address, password, mailstore, "
                             "alternate, alias)"),
])
def test_bad_options_and_credentials_are_one_line_and_change_nothing(
        change: dict[str, str], message: str, slapd_factory: Factory, r: redis.Redis, redis_url: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = slapd_factory([LdapUser("alice", "alice@example.com", ssha("pw"))])
    secret = tmp_path / "secret"
    secret.write_text(change.get("password", READER_PASSWORD))
    args = ["--ldap-url", server.url, "--ldap-base", change.get("base", PEOPLE_DN),
            "--ldap-bind-dn", READER_DN, "--ldap-password-file", change.get("password_file", str(secret))]
    if "filter" in change:
        args += ["--ldap-filter", change["filter"]]
    if "map" in change:
        args += ["--ldap-map", change["map"]]
    rc, out, err = run(args, redis_url, capsys)
    assert (rc, out) == (1, "")
    assert err == "fallback provision: " + message.format(url=server.url) + "\n"
    assert directory(r).count() == 0


def test_file_and_ldap_url_are_one_or_the_other(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (["provision"], ["provision", str(tmp_path / "x.csv"), "--ldap-url", "ldap://127.0.0.1:1"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "error: give either FILE or --ldap-url" in capsys.readouterr().err


def test_sync_from_ldap_removes_who_left(slapd_factory: Factory, r: redis.Redis, redis_url: str,
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = [LdapUser(f"u{i}", f"u{i}@example.com", ssha(f"pw{i}")) for i in range(20)]
    first = slapd_factory(users)
    assert run(reader_args(first, tmp_path), redis_url, capsys)[0] == 0
    first.stop()
    second = slapd_factory(users[1:])
    rc, out, _ = run([*reader_args(second, tmp_path), "--dry-run", "--sync"], redis_url, capsys)
    assert rc == 0 and "would be removed (1): u0@example.com" in out
    assert directory(r).get("u0@example.com") is not None
    rc, out, _ = run([*reader_args(second, tmp_path), "--sync"], redis_url, capsys)
    assert rc == 0 and "removed (1): u0@example.com" in out
    d = directory(r)
    assert d.get("u0@example.com") is None and d.count() == 19


def _stored_aliases(r: redis.Redis) -> dict[str, tuple[tuple[str, ...], str]]:
    store = Aliases(r, ensure_buckets(r, 65536))
    return {a.address: (a.targets, a.origin) for a in store.entries()}


def test_ldap_sync_removes_only_the_aliases_ldap_created(
        slapd_factory: Factory, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    mapping = ["--ldap-map", "alias=mailLocalAddress"]
    first = slapd_factory([
        LdapUser("alice", "alice@example.com", ssha("pw-a"),
                 aliases=["sales@example.com", "info@example.com", "taken@example.com"]),
        LdapUser("bob", "bob@example.com", ssha("pw-b"), aliases=["sales@example.com"]),
    ])
    virtual = tmp_path / "virtual"
    virtual.write_text("virt@example.com  outside@remote.test\ntaken@example.com  outside@remote.test\n")
    assert run([str(virtual), "--format", "virtual"], redis_url, capsys)[0] == 0
    assert main(["alias", "add", "hand@example.com", "bob@example.com", "--redis-url", redis_url]) == 0
    rc, _, err = run([*reader_args(first, tmp_path), *mapping, "--sync"], redis_url, capsys)
    assert (rc, err) == (0, "")
    # LDAP names taken@ too: it takes the alias over, origin included.
    assert _stored_aliases(r) == {
        "sales@example.com": (("alice@example.com", "bob@example.com"), LDAP),
        "info@example.com": (("alice@example.com",), LDAP),
        "taken@example.com": (("alice@example.com",), LDAP),
        "virt@example.com": (("outside@remote.test",), VIRTUAL),
        "hand@example.com": (("bob@example.com",), MANUAL)}
    first.stop()
    # Alice lost info@ and taken@, Bob lost sales@: gone from LDAP, so gone here; the others stay.
    second = slapd_factory([
        LdapUser("alice", "alice@example.com", ssha("pw-a"), aliases=["sales@example.com"]),
        LdapUser("bob", "bob@example.com", ssha("pw-b")),
    ])
    before = snapshot(r)
    rc, out, err = run([*reader_args(second, tmp_path), *mapping, "--sync", "--dry-run", "--force"],
                       redis_url, capsys)
    assert snapshot(r) == before
    assert (rc, err) == (0, "")
    assert f"synced aliases from {second.url} {PEOPLE_DN} (dry run: nothing was changed)\n" in out
    assert "would be changed (1): sales@example.com\n" in out
    assert "would be removed (2): info@example.com, taken@example.com\n" in out
    rc, out, err = run([*reader_args(second, tmp_path), *mapping, "--sync", "--force"], redis_url, capsys)
    assert (rc, err) == (0, "")
    assert "removed (2): info@example.com, taken@example.com\n" in out
    assert _stored_aliases(r) == {
        "sales@example.com": (("alice@example.com",), LDAP),
        "virt@example.com": (("outside@remote.test",), VIRTUAL),
        "hand@example.com": (("bob@example.com",), MANUAL)}
    assert directory(r).count() == 2


def test_ldap_alias_removal_limit_counts_ldap_aliases_only(
        slapd_factory: Factory, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    users = [LdapUser(f"u{i}", f"u{i}@example.com", ssha(f"pw{i}"), aliases=[f"a{i}@example.com"])
             for i in range(20)]
    mapping = ["--ldap-map", "alias=mailLocalAddress"]
    first = slapd_factory(users)
    assert run([*reader_args(first, tmp_path), *mapping], redis_url, capsys)[0] == 0
    first.stop()
    # 100 aliases from a virtual file: counted against all 120, 3 removals would be within 10 %.
    virtual = tmp_path / "virtual"
    virtual.write_text("".join(f"v{i}@example.com  outside@remote.test\n" for i in range(100)))
    assert run([str(virtual), "--format", "virtual"], redis_url, capsys)[0] == 0

    def without_aliases(n: int) -> list[LdapUser]:
        # n users lose their alias; u19 also gets a new password, which a refusal must not write.
        kept = [replace(u, aliases=[]) if i < n else u for i, u in enumerate(users)]
        kept[19] = replace(kept[19], password=ssha("new"))
        return kept

    past = slapd_factory(without_aliases(3))
    before = snapshot(r)
    rc, out, err = run([*reader_args(past, tmp_path), *mapping, "--sync"], redis_url, capsys)
    assert (rc, out, err) == (1, "", "fallback provision: --sync would remove 3 of 20 aliases from LDAP "
                                     "(15 %), more than --max-remove 10 %; a truncated export? Check the "
                                     "file, or give --force\n")
    assert snapshot(r) == before
    past.stop()
    at = slapd_factory(without_aliases(2))
    rc, out, err = run([*reader_args(at, tmp_path), *mapping, "--sync"], redis_url, capsys)
    assert (rc, err) == (0, "")
    stored = _stored_aliases(r)
    assert sorted(a for a, (_, origin) in stored.items() if origin == LDAP) == \
        sorted(f"a{i}@example.com" for i in range(2, 20))
    assert sum(origin == VIRTUAL for _, origin in stored.values()) == 100
    assert verify_password("new", directory(r).get("u19@example.com").password_hash)


# --- ldaps:// with a CA of the operator's (--ldap-ca-file) --------------------------------------

def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tls_files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(the CA's certificate, slapd's certificate and key signed by it for 127.0.0.1, another CA)."""
    ca, ca_key = _ca("fallback test LDAP CA")
    other, _ = _ca("someone else's CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return (_pem(tmp_path / "ca.pem", ca.public_bytes(pem)),
            _pem(tmp_path / "slapd.pem", cert.public_bytes(pem)), _pem(tmp_path / "slapd.key", key_pem),
            _pem(tmp_path / "other-ca.pem", other.public_bytes(pem)))


def test_ldaps_with_the_operators_ca_and_a_wrong_one(
        slapd_factory: Callable[..., SlapdServer], r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    ca, cert, key, other = tls_files(tmp_path)
    server = slapd_factory([LdapUser("alice", "alice@example.com", ssha("pw-a"))], tls=(cert, key))
    assert server.url.startswith("ldaps://127.0.0.1:")
    # Not trusted by the system's CAs, nor by another CA: one line each, nothing stored.
    for extra, reason in (
            ([], "its TLS certificate is not signed by a CA the system trusts (give --ldap-ca-file)"),
            (["--ldap-ca-file", str(other)], f"its TLS certificate is not signed by a CA in {other}")):
        rc, out, err = run([*reader_args(server, tmp_path), *extra], redis_url, capsys)
        assert (rc, out, err) == (1, "", f"fallback provision: LDAP {server.url} unreachable: {reason}\n")
        assert directory(r).count() == 0
    rc, out, err = run([*reader_args(server, tmp_path), "--ldap-ca-file", str(ca)], redis_url, capsys)
    assert (rc, err) == (0, ""), out + err
    assert verify_password("pw-a", directory(r).get("alice@example.com").password_hash)


def test_bad_ldap_ca_file_is_one_line(r: redis.Redis, redis_url: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    url = f"ldaps://127.0.0.1:{free_port()}"
    for ldap_url, ca_file, message in (
            (url, missing, f"--ldap-ca-file: {missing} does not exist"),
            (url, not_pem, f"--ldap-ca-file: {not_pem} holds no PEM certificate"),
            ("ldap://127.0.0.1:389", not_pem, "--ldap-ca-file is for ldaps:// URLs; ldap://127.0.0.1:389 "
                                              "is not encrypted")):
        rc, out, err = run(["--ldap-url", ldap_url, "--ldap-base", PEOPLE_DN, "--ldap-ca-file", str(ca_file)],
                           redis_url, capsys)
        assert (rc, out, err) == (1, "", f"fallback provision: {message}\n")
    assert directory(r).count() == 0


# --- alternate=ATTR and alias=ATTR ----------------------------------------------------------------

def test_alternate_is_the_contact_address_and_alias_addresses_receive_mail(
        slapd_factory: Factory, r: redis.Redis, redis_url: str, settings: Any, tmp_path: Path,
        receiver_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`alias=mailAlternateAddress`: each value an address of the mailbox, delivered to it by the
    real receiver; `alternate=ATTR`: the one outside address failover notices go to (no alias)."""
    server = slapd_factory([
        LdapUser("alice", "alice@example.com", ssha("pw-a"), extra_classes=["extensibleObject"],
                 extra=["mailAlternateAddress: a.smith@example.com",
                        "mailAlternateAddress: alice@example.org",
                        "contactMail: alice.private@remote.test"]),
        LdapUser("bob", "bob@example.com", ssha("pw-b"), extra_classes=["extensibleObject"],
                 extra=["contactMail: bob@home.test", "contactMail: bob@work.test"]),
    ])
    mapping = ["--ldap-map", "alias=mailAlternateAddress,alternate=contactMail",
               "--mailstore", "store1"]
    rc, out, err = run([*reader_args(server, tmp_path), *mapping], redis_url, capsys)
    # bob's two contact addresses: his entry is refused by DN, alice's loads.
    assert rc == 1
    assert f"uid=bob,{PEOPLE_DN}: 2 values of contactMail (the alternate address); expected one" in out
    assert err == "fallback provision: 1 invalid LDAP entry; the other entries were loaded\n"
    d = directory(r)
    assert d.get("bob@example.com") is None
    alice = d.get("alice@example.com")
    assert (alice.mailstore, alice.alternate) == ("store1", "alice.private@remote.test")
    book = Aliases(r, d.buckets)
    assert book.get("a.smith@example.com").targets == ("alice@example.com",)
    assert book.get("alice@example.org").targets == ("alice@example.com",)
    assert book.get("alice.private@remote.test") is None  # the contact address receives nothing here
    failover.start(r, ["store1"])
    rt = receiver_factory()
    with smtplib.SMTP("127.0.0.1", rt.port, source_address=("127.0.0.2", 0), timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@remote.test")
        assert s.rcpt("A.Smith@example.com") == (250, b"2.1.5 Recipient OK")
        assert s.rcpt("alice.private@remote.test")[0] == 550
        assert s.data(b"Subject: to the alternate address\r\n\r\nhi\r\n")[0] == 250
    with smtplib.SMTP("127.0.0.1", rt.port, source_address=("127.0.0.3", 0), timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@remote.test")
        assert s.rcpt("alice@example.org")[0] == 250
        assert s.data(b"Subject: to the other domain\r\n\r\nhi\r\n")[0] == 250
    reader = store.MailboxReader(r, "alice@example.com")
    raws = sorted(reader.raw(i) or b"" for i in reader.ids("INBOX"))
    assert len(raws) == 2
    assert sum(b"\r\nDelivered-To: a.smith@example.com\r\n" in raw for raw in raws) == 1
    assert sum(b"\r\nDelivered-To: alice@example.org\r\n" in raw for raw in raws) == 1


def test_ldap_sync_that_finds_nobody_is_refused_even_with_force(
        slapd_factory: Factory, r: redis.Redis, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    server = slapd_factory([LdapUser(f"u{i}", f"u{i}@example.com", ssha(f"pw{i}")) for i in range(3)])
    assert run(reader_args(server, tmp_path), redis_url, capsys)[0] == 0
    before = snapshot(r)
    nobody = [*reader_args(server, tmp_path), "--ldap-filter", "(uid=left-the-company)", "--sync"]
    rc, out, err = run([*nobody, "--force"], redis_url, capsys)
    assert (rc, out, err) == (1, "", f"fallback provision: {server.url} {PEOPLE_DN} has no entries; refusing "
                                     "to empty the directory (3 mailboxes), even with --force: give "
                                     "--allow-empty if that is what you want\n")
    assert snapshot(r) == before
    rc, _, err = run([*nobody, "--allow-empty"], redis_url, capsys)
    assert (rc, err) == (0, "") and directory(r).count() == 0
