"""Settings: precedence of the sources, and a table of bad configs with the one line each prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from fallback.cli import main
from fallback.config import MIB, load_settings, read_secret_file, settings_table
from fallback.errors import ConfigError


def test_precedence_flags_env_toml_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "fallback.toml"
    toml.write_text('smtp_port = 2600\nmax_recipients = 50\nhostname = "from-toml"\n'
                    'max-message-size = "10MiB"\n')
    env = {"FALLBACK_SMTP_PORT": "2700", "FALLBACK_HOSTNAME": "from-env", "FALLBACK_CONFIG": str(toml)}
    s = load_settings({"smtp_port": "2800"}, env=env)
    assert s.smtp_port == 2800                  # flag beats env and TOML
    assert s.hostname == "from-env"             # env beats TOML
    assert s.max_recipients == 50               # TOML beats the default
    assert s.max_message_size == 10 * MIB       # TOML keys may use dashes; sizes take units
    assert s.max_connections == 1000            # default
    assert load_settings({}, env={}).smtp_port == 2525
    assert load_settings({"config": str(toml)}, env={}).smtp_port == 2600
    # Units on the flag/env side too.
    s = load_settings({"idle_timeout": "5m", "max_message_size": "512KiB"}, env={})
    assert (s.idle_timeout, s.max_message_size) == (300.0, 512 * 1024)


def test_config_table_is_generated_from_the_schema() -> None:
    table = settings_table()
    assert "| `--smtp-port` | `FALLBACK_SMTP_PORT` | 2525 |" in table
    assert "| `--max-message-size` | `FALLBACK_MAX_MESSAGE_SIZE` | 50 MiB |" in table


# (flags, env, TOML text, the one-line error)
BAD = [
    ({}, {"FALLBACK_SMTP_PORT": "abc"}, None, "FALLBACK_SMTP_PORT: not a whole number: 'abc'"),
    ({"smtp_port": "70000"}, {}, None, "smtp_port: 70000 is not a port number (0-65535)"),
    ({"max_message_size": "50 parsecs"}, {}, None,
     "--max-message-size: not a size: '50 parsecs' (use e.g. 52428800, 50MiB, 512KiB)"),
    ({}, {"FALLBACK_CONNECTION_TIMEOUT": "soon"}, None,
     "FALLBACK_CONNECTION_TIMEOUT: not a duration: 'soon' (use e.g. 60, 90s, 10m, 5d)"),
    ({}, {"FALLBACK_MAX_RECIPIENTS": "0"}, None, "max_recipients: must be greater than 0"),
    ({"tls_cert": "/nonexistent/cert.pem"}, {}, None, "tls_cert and tls_key must be given together"),
    ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}, {}, None,
     "tls_cert: /nonexistent/cert.pem is not a readable file"),
    ({}, {"FALLBACK_LOG_LEVEL": "LOUD"}, None, "log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR"),
    ({}, {"FALLBACK_EVENT_LOOP": "trio"}, None, "event_loop: 'trio' is not one of uvloop, asyncio"),
    ({}, {"FALLBACK_PASSWORD_SCHEME": "MD5"}, None,
     "password_scheme: 'MD5' is not one of ARGON2ID, ARGON2I, BLF-CRYPT, SHA512-CRYPT, SHA256-CRYPT"),
    ({}, {"FALLBACK_REDIS_URL": "http://user:pw@x"}, None,
     "redis_url: 'http://user:***@x' must start with redis://, rediss://, unix://, redis+cluster:// "
     "or redis+sentinel://"),
    ({"redis_url": "redis+cluster://"}, {}, None, "redis_url: 'redis+cluster://' names no HOST:PORT"),
    ({"redis_url": "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2"}, {}, None,
     "redis_url: 'redis+cluster://:***@10.0.0.1:7000,10.0.0.2': '10.0.0.2' is not HOST:PORT"),
    ({"redis_url": "redis+cluster://10.0.0.1:7000/2"}, {}, None,
     "redis_url: 'redis+cluster://10.0.0.1:7000/2': a Redis Cluster has no databases; remove the path"),
    ({"redis_url": "redis+sentinel://10.0.0.1:26379"}, {}, None,
     "redis_url: 'redis+sentinel://10.0.0.1:26379' must name the Sentinel service: "
     "redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE"),
    ({"redis_url": "redis+sentinel://10.0.0.1:26379/mail?db=2"}, {}, None,
     "redis_url: 'redis+sentinel://10.0.0.1:26379/mail?db=2': unknown option 'db' (only sentinel_password)"),
    ({}, {"FALLBACK_REPLICA_ACKS": "-1"}, None,
     "replica_acks: must be 0 (no replica acknowledgement) or more"),
    ({"workers": "-2"}, {}, None, "workers: must be 0 (one per CPU) or more"),
    ({}, {"FALLBACK_DEMO": "maybe"}, None, "FALLBACK_DEMO: not a boolean: 'maybe' (use true or false)"),
    ({}, {}, "smtp_port = 'x'\n", "{path}: smtp_port: not a whole number: 'x'"),
    ({}, {}, "smtp_port = true\n", "{path}: smtp_port: expected a number, got True"),
    ({}, {}, "smpt_port = 25\n", "config file {path}: unknown setting 'smpt_port'"),
    ({}, {}, "smtp_port = \n", "config file {path}: Invalid value (at line 1, column 13)"),
    # Issue 17: the page cache; issue 16: the message trace.
    ({"web_page_cache": "-1"}, {}, None,
     "--web-page-cache: not a size: '-1' (use e.g. 52428800, 50MiB, 512KiB)"),
    ({}, {}, "web_page_cache = -1\n", "web_page_cache: must be 0 (off) or more bytes (e.g. 32MiB)"),
    ({"trace_retention": "-5"}, {}, None,
     "--trace-retention: not a duration: '-5' (use e.g. 60, 90s, 10m, 5d)"),
    ({}, {}, "trace_retention = -5\n",
     "trace_retention: must be 0 (no trace) or more seconds (e.g. 14d)"),
]


@pytest.mark.parametrize(("flags", "env", "toml", "message"), BAD)
def test_bad_config_one_line(flags: dict[str, str], env: dict[str, str], toml: str | None, message: str,
                             tmp_path: Path) -> None:
    path = None
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(flags, env=env, config_file=path)
    assert str(info.value) == message.format(path=path)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file .*nope.toml does not exist$"):
        load_settings({}, env={}, config_file=tmp_path / "nope.toml")


def test_bad_config_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALLBACK_SMTP_PORT", "abc")
    assert main(["status", "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    err = capsys.readouterr().err
    assert err == "fallback status: FALLBACK_SMTP_PORT: not a whole number: 'abc'\n"


def test_cluster_and_sentinel_urls_parse() -> None:
    from fallback.config.redisurl import parse_topology

    t = parse_topology("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001")
    assert t is not None and t.kind == "cluster" and t.password == "p@ss" and t.username == "u"
    assert t.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    t = parse_topology("redis+sentinel://:pw@s1:26379,s2:26379/mail?sentinel_password=sp")
    assert t is not None and (t.kind, t.service, t.password, t.sentinel_password) == (
        "sentinel", "mail", "pw", "sp")
    assert parse_topology("redis://127.0.0.1:6379/0") is None


def test_workers_sets_both_pools_unless_one_is_given() -> None:
    s = load_settings({"workers": "3"}, env={})
    assert (s.smtp_workers, s.web_workers) == (3, 3)
    s = load_settings({"workers": "3", "web_workers": "1"}, env={})
    assert (s.smtp_workers, s.web_workers) == (3, 1)


def test_read_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"  s3cret pass \r\n")
    assert read_secret_file("admin_token_file", secret) == "s3cret pass"
    assert read_secret_file("smarthost_password_file", secret, keep_spaces=True) == "  s3cret pass "
    with pytest.raises(ConfigError, match=rf"^admin_token_file: cannot read {tmp_path}/nope: .*No such file"):
        read_secret_file("admin_token_file", tmp_path / "nope")
    secret.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ConfigError, match=r"^secret_key_file: cannot read .*utf-8"):
        read_secret_file("secret_key_file", secret)
