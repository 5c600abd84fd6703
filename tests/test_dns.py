"""`fallback dns`: RFC 2136 updates signed with TSIG, against a real BIND on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fallback.cli import main
from fallback.ops import audit
from tests.bind import ZONE, BindServer

FALLBACK_MX = "10 fallback.example.com"
PRIMARY_MX = "10 mx1.example.com, 20 mx2.example.com"


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BindServer]:
    server = BindServer(tmp_path_factory.mktemp("bind")).start()
    yield server
    server.stop()


def dns_args(bind: BindServer, redis_url: str, key_file: Path | None = None, *extra: str) -> list[str]:
    return ["--redis-url", redis_url, "--dns-server", f"127.0.0.1:{bind.port}", "--dns-zone", ZONE,
            "--dns-tsig-key-file", str(key_file or bind.key_file), "--dns-fallback-mx", FALLBACK_MX,
            "--dns-primary-mx", PRIMARY_MX, "--dns-low-ttl", "120", *extra, "--actor", "oncall"]


def mx_texts(bind: BindServer) -> set[str]:
    rrset = bind.mx()
    assert rrset is not None
    return {rd.to_text() for rd in rrset}


def test_switch_to_fallback_and_back(bind: BindServer, r: redis.Redis, redis_url: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert mx_texts(bind) == {"10 mx1.example.com.", "20 mx2.example.com."}
    serial = bind.serial()

    assert main(["dns", "switch", "--to", "fallback", *dns_args(bind, redis_url)]) == 0
    out = capsys.readouterr().out
    assert "lower the TTL" in out and "point example.com. MX at the fallback" in out
    assert mx_texts(bind) == {"10 fallback.example.com."}
    rrset = bind.mx()
    assert rrset is not None and rrset.ttl == 120
    assert bind.serial() >= serial + 2  # two updates: TTL first, then the records

    # Already there: nothing is sent, the serial does not move.
    serial = bind.serial()
    assert main(["dns", "switch", "--to", "fallback", *dns_args(bind, redis_url)]) == 0
    assert "nothing sent" in capsys.readouterr().out
    assert bind.serial() == serial

    assert main(["dns", "switch", "--to", "primary", *dns_args(bind, redis_url)]) == 0
    assert mx_texts(bind) == {"10 mx1.example.com.", "20 mx2.example.com."}

    # Raising the TTL back after the incident is a switch with --ttl.
    assert main(["dns", "switch", "--to", "primary", "--ttl", "3600", *dns_args(bind, redis_url)]) == 0
    rrset = bind.mx()
    assert rrset is not None and rrset.ttl == 3600

    entries = audit.recent(r, 10)
    switches = [e for e in entries if e.action == "dns switch"]
    assert [e.args["to"] for e in switches] == ["primary", "primary", "fallback"]
    assert all(e.actor == "oncall" and e.outcome == "ok" for e in switches)


def test_lower_ttl_keeps_records(bind: BindServer, redis_url: str, r: redis.Redis,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dns", "switch", "--to", "primary", "--ttl", "3600", *dns_args(bind, redis_url)]) == 0
    before = mx_texts(bind)
    assert main(["dns", "lower-ttl", *dns_args(bind, redis_url)]) == 0
    rrset = bind.mx()
    assert rrset is not None and rrset.ttl == 120 and mx_texts(bind) == before
    assert main(["dns", "show", *dns_args(bind, redis_url)[:-2]]) == 0
    assert "120 IN MX 10 mx1.example.com." in capsys.readouterr().out


def test_dry_run_changes_nothing(bind: BindServer, redis_url: str, r: redis.Redis,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dns", "switch", "--to", "primary", "--ttl", "3600", *dns_args(bind, redis_url)]) == 0
    capsys.readouterr()
    serial, before, audited = bind.serial(), mx_texts(bind), len(audit.recent(r, 100))
    assert main(["dns", "switch", "--to", "fallback", "--dry-run", *dns_args(bind, redis_url)]) == 0
    out = capsys.readouterr().out
    assert "dry run: not sent" in out
    assert "fallback.example.com." in out and "UPDATE" in out
    assert bind.serial() == serial and mx_texts(bind) == before
    assert len(audit.recent(r, 100)) == audited


def test_wrong_tsig_secret_is_a_clear_error(bind: BindServer, redis_url: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = mx_texts(bind)
    wrong = tmp_path / "wrong.key"
    wrong.write_text('key "fallback-dns" {\n\talgorithm hmac-sha256;\n\t'
                     'secret "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";\n};\n')
    assert main(["dns", "switch", "--to", "fallback", *dns_args(bind, redis_url, wrong)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fallback dns: ") and "TSIG signature rejected" in err
    assert len(err.strip().splitlines()) == 1
    assert mx_texts(bind) == before


def test_unknown_tsig_key_is_a_clear_error(bind: BindServer, redis_url: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = mx_texts(bind)
    other = tmp_path / "other.key"
    other.write_text(bind.key_file.read_text().replace("fallback-dns", "someone-else"))
    assert main(["dns", "switch", "--to", "fallback", *dns_args(bind, redis_url, other)]) == 1
    assert "does not know TSIG key someone-else" in capsys.readouterr().err
    assert mx_texts(bind) == before


def test_key_not_allowed_to_update_is_refused(bind: BindServer, redis_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The policy grants MX at the apex only: updating another name is refused, and says why."""
    before = mx_texts(bind)
    assert main(["dns", "switch", "--to", "fallback", *dns_args(bind, redis_url), "--dns-mx-name",
                 "mail"]) == 1
    err = capsys.readouterr().err
    assert "REFUSED" in err and "update-policy" in err
    assert mx_texts(bind) == before


@pytest.mark.parametrize("flags, message", [
    (["--dns-fallback-mx", "fallback.example.com"], "dns_fallback_mx: 'fallback.example.com' is not "
                                                    "'PREFERENCE HOST'"),
    (["--dns-fallback-mx", ""], "dns_fallback_mx: not set"),
    (["--dns-server", "127.0.0.1:99999"], "dns_server: 99999 is not a port number"),
])
def test_bad_settings_name_the_setting(bind: BindServer, redis_url: str, flags: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = mx_texts(bind)
    assert main(["dns", "switch", "--to", "fallback", *dns_args(bind, redis_url), *flags]) == 1
    assert message in capsys.readouterr().err
    assert mx_texts(bind) == before


def test_missing_settings_and_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dns", "switch", "--to", "fallback"]) == 1
    assert "dns_server, dns_zone, dns_tsig_key_file: needed" in capsys.readouterr().err
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    assert main(["dns", "show", "--dns-server", "127.0.0.1", "--dns-zone", ZONE,
                 "--dns-tsig-key-file", str(junk)]) == 1
    assert "has no `key" in capsys.readouterr().err


def test_server_down_is_one_line_and_audit_goes_to_file(tmp_path: Path, bind: BindServer,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """No Redis and no DNS server: the error is one line; the failed attempt is in the audit file."""
    from tests.servers import free_port

    log = tmp_path / "audit.jsonl"
    argv = ["dns", "switch", "--to", "fallback", "--dns-server", f"127.0.0.1:{free_port()}",
            "--dns-zone", ZONE, "--dns-tsig-key-file", str(bind.key_file), "--dns-fallback-mx",
            FALLBACK_MX, "--dns-timeout", "2", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
            "--audit-log", str(log), "--actor", "oncall"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fallback dns: query at 127.0.0.1:") and len(err.splitlines()) == 1
    # The query failed before any update: nothing was attempted, so nothing is audited.
    assert not log.exists()
    # With the server up but Redis down, the switch is audited to the file, with a warning.
    argv[5] = f"127.0.0.1:{bind.port}"
    assert main([*argv, "--dns-low-ttl", "60"]) == 0
    assert "audit entry not written to Redis" in capsys.readouterr().err
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["action"] == "dns switch" and entry["actor"] == "oncall" and entry["outcome"] == "ok"
    assert entry["args"]["to"] == "fallback"
