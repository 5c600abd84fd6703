"""The one typed configuration of the service.

`Settings` is the whole schema: every setting has a type, a default and a line
of documentation.  `load_settings` layers the sources, lowest first:
defaults, then an optional TOML file, then `FALLBACK_*` environment variables,
then command-line flags, and validates the result once, failing fast with a
one-line `ConfigError` that names the setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fallback.errors import ConfigError, FallbackError

ENV_PREFIX = "FALLBACK_"
KIB = 1024
MIB = 1024 * KIB


def setting(default: Any, doc: str, unit: str | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"doc": doc, "unit": unit, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # Where state lives.
    data_dir: Path = setting(Path("./fallback-data"),
                             "Directory for the embedded Redis and runtime files")
    redis_url: str | None = setting(
        None,
        "Redis to use (redis://, rediss://, unix://, redis+cluster://H:P,H:P, redis+sentinel://H:P/SERVICE); "
        "unset: the embedded redis-server of `fallback up`",
        secret=True,
    )
    redis_server: str = setting("redis-server", "redis-server binary for the embedded Redis")
    redis_maxmemory: str | None = setting(None,
                                          "maxmemory of the embedded Redis (e.g. 4gb); unset: no limit")
    replica_acks: int = setting(
        0, "Replicas that must hold each accepted message before 250 (WAIT, or WAITAOF on Redis 7.2+); "
        "0: the primary's own fsync only")
    replica_ack_timeout: float = setting(
        2.0, "How long a write waits for replica_acks before the sender gets 451", unit="seconds")
    # The SMTP receiver.
    hostname: str | None = setting(None, "Name in the SMTP greeting and Received: lines; unset: hostname")
    smtp_host: str = setting("127.0.0.1", "Address the SMTP receiver listens on (0.0.0.0 for all)")
    smtp_port: int = setting(2525, "SMTP receiver port")
    max_message_size: int = setting(
        50 * MIB, "Largest message accepted (SIZE and actual), bytes; suffixes KiB/MiB", unit="bytes")
    max_recipients: int = setting(100, "Most RCPT TO per message; more get 452 4.5.3")
    max_connections: int = setting(1000, "Concurrent SMTP connections in total; more get 421 4.7.0")
    max_connections_per_ip: int = setting(20, "Concurrent SMTP connections from one client IP")
    max_commands: int = setting(1000, "Times one SMTP command may be given on one connection")
    connection_timeout: float = setting(600.0, "Whole-connection time limit, seconds", unit="seconds")
    idle_timeout: float = setting(300.0, "Idle time allowed between SMTP commands, seconds", unit="seconds")
    smtp_workers: int = setting(
        1, "SMTP receiver processes sharing the port (SO_REUSEPORT), to use every core; 0: one per CPU")
    workers: int | None = setting(
        None, "`fallback up`: processes for the SMTP receiver and for the webmail at once (sets "
        "smtp_workers and web_workers unless they are given); 0: one per CPU")
    smtp_reuse_port: bool = setting(
        False, "Bind the SMTP port with SO_REUSEPORT (set for every receiver when smtp_workers > 1)")
    tls_cert: Path | None = setting(None, "PEM certificate for STARTTLS (with tls_key)")
    tls_key: Path | None = setting(None, "PEM private key for STARTTLS (with tls_cert)")
    # The webmail.
    http_host: str = setting("127.0.0.1", "Address the webmail listens on")
    http_port: int = setting(8080, "Webmail port")
    secret_key: str | None = setting(
        None, "Webmail secret for signing form tokens (32+ characters); --demo makes one up",
        secret=True)
    secret_key_file: Path | None = setting(None, "File holding the webmail secret (instead of secret_key)")
    session_idle_timeout: float = setting(
        1800.0, "Webmail sessions end after this much idle time, seconds", unit="seconds")
    cookie_secure: bool | None = setting(
        None, "Send the session cookie over HTTPS only; unset: yes, except with --demo")
    max_upload_size: int = setting(
        25 * MIB, "Largest total of attachments in one composed message, bytes", unit="bytes")
    incident_message: str = setting(
        "Our main mail system is down. We are working on it.",
        "Operator's message on the public /status page and the login page")
    web_workers: int = setting(2, "gunicorn worker processes of the webmail")
    web_threads: int = setting(4, "Threads per gunicorn worker (concurrent requests each)")
    # Directory and passwords.
    directory_buckets: int = setting(65536, "Hash buckets of the user directory (fixed at first use)")
    password_scheme: str = setting("ARGON2ID", "Scheme used to hash plain-text passwords on import")
    directory_cache_ttl: float = setting(
        10.0, "Seconds a receiver reuses a found mailbox's directory record (0: look up every RCPT)",
        unit="seconds")
    # Logging.
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING, ERROR")
    mail_log: str = setting("-", "Mail log destination: - for stderr, or a file path")
    demo: bool = setting(False, "Provision a demo mailbox at start (fallback up)")
    # Reconcile.
    imap_url: str | None = setting(None, "Main store for reconcile: imap://HOST:PORT or imaps://HOST:PORT")
    master_user: str | None = setting(None, "Dovecot master user that reconcile logs in as")
    master_password_file: Path | None = setting(None, "File holding the master user's password")
    master_separator: str = setting(
        "*", "Separator of USER*MASTER logins; empty: SASL PLAIN with an authorization id")
    imap_ca_file: Path | None = setting(None, "CA bundle for imaps:// (default: the system's)")
    imap_timeout: float = setting(120.0, "Time limit of one IMAP command, seconds", unit="seconds")
    reconcile_sent_folder: str = setting("Sent", "Sent folder when the server announces no \\Sent")
    reconcile_trash_folder: str = setting("Trash", "Trash folder when the server announces no \\Trash")
    reconcile_concurrency: int = setting(8, "Mailboxes reconciled in parallel (IMAP connections)")
    # Outbound delivery.
    smarthost: str | None = setting(
        None, "Smarthost HOST:PORT the outbound worker relays sent mail through; unset: mail stays queued")
    smarthost_tls: str = setting("starttls", "TLS to the smarthost: none, starttls or tls (implicit)")
    smarthost_user: str | None = setting(None, "User for SMTP AUTH at the smarthost (with a password file)")
    smarthost_password_file: Path | None = setting(None, "File holding the smarthost AUTH password")
    smarthost_ca_file: Path | None = setting(
        None, "CA bundle that signs the smarthost's certificate (default: the system's)")
    smarthost_timeout: float = setting(60.0, "Time limit of one SMTP command to the smarthost, seconds",
                                       unit="seconds")
    retry_base: float = setting(60.0, "First retry delay after a temporary failure, seconds; doubles "
                                "each attempt, with jitter", unit="seconds")
    retry_max_interval: float = setting(4 * 3600.0, "Longest delay between two attempts, seconds",
                                        unit="seconds")
    retry_deadline: float = setting(5 * 86400.0, "Give up on a recipient (and notify the sender) "
                                    "this long after the message was sent, seconds", unit="seconds")
    claim_timeout: float = setting(120.0, "Work a silent (crashed) worker holds this long is taken over "
                                   "by another worker, seconds", unit="seconds")
    max_crashes: int = setting(5, "Times a message may be taken up without the attempt finishing "
                               "(worker crash or error) before it is parked as a dead letter")
    worker_concurrency: int = setting(8, "Messages one worker delivers at the same time")
    dkim_selector: str | None = setting(None, "DKIM selector; sign mail of domains with a key in "
                                        "dkim_key_dir")
    dkim_key_dir: Path | None = setting(None, "Directory of DKIM private keys, one PEM file per "
                                        "domain named DOMAIN.pem")
    # Failover and operations.
    failover_cache_ttl: float = setting(
        2.0, "How long the receiver and webmail may reuse a read of the failover scope, seconds",
        unit="seconds")
    audit_log: Path | None = setting(
        None, "Also append every admin action as a JSON line to this file (Redis stream `audit` always)")
    admin_token: str | None = setting(None, "Bearer token of the admin HTTP API; unset: API off",
                                      secret=True)
    admin_token_file: Path | None = setting(None, "File holding the admin API token (instead of admin_token)")
    dns_server: str | None = setting(
        None, "Primary authoritative DNS server that takes the MX updates: HOST, HOST:PORT or [IPv6]:PORT")
    dns_zone: str | None = setting(None, "Zone that holds the MX records, e.g. example.com")
    dns_tsig_key_file: Path | None = setting(
        None, "TSIG key for the updates: a BIND key clause as `tsig-keygen` writes it")
    dns_mx_name: str = setting("@", "Owner of the MX records, relative to the zone (@: the zone apex)")
    dns_primary_mx: str | None = setting(
        None, "MX records of normal operation, e.g. '10 mx1.example.com, 20 mx2.example.com'")
    dns_fallback_mx: str | None = setting(
        None, "MX records during the outage, e.g. '10 fallback.example.net'")
    dns_low_ttl: int = setting(300, "TTL (seconds) the MX records get before and after a switch")
    dns_timeout: float = setting(10.0, "Time limit of one DNS query or update, seconds", unit="seconds")
    check_warn_queue_age: float = setting(
        3600.0, "fallback check: WARNING when the oldest queued message is this old, seconds",
        unit="seconds")
    check_crit_queue_age: float = setting(
        4 * 3600.0, "fallback check: CRITICAL when the oldest queued message is this old, seconds",
        unit="seconds")
    forward_to: str | None = setting(
        None, "Next hop of the main mail system for users whose mailstore is not failed over: "
        "smtp://HOST:PORT or lmtp://HOST:PORT; unset: their mail waits in the forward queue")
    forward_alert_age: float = setting(
        3600.0, "Forwarded mail still waiting this long is alerted (log; fallback check WARNING); "
        "it keeps waiting, seconds", unit="seconds")
    forward_retry_base: float = setting(
        30.0, "First retry delay of a forward the next hop did not take, seconds; doubles each "
        "attempt, with jitter", unit="seconds")
    forward_retry_max_interval: float = setting(
        600.0, "Longest delay between two forward attempts, seconds (it never gives up)", unit="seconds")
    forward_timeout: float = setting(60.0, "Time limit of one command to the forward next hop, seconds",
                                     unit="seconds")
    metrics_flush_interval: float = setting(
        5.0, "How often a process adds its counters (mail events, log-ins) to the shared ones in "
        "Redis that /metrics reads, seconds", unit="seconds")
    notice_sender: str | None = setting(
        None, "From address of the user notices of `failover start/stop --notify`; unset: "
        "postmaster@ the first provisioned domain")
    webmail_url: str | None = setting(
        None, "The webmail's public URL, as users should type it (https://...), for the notices")
    check_warn_memory: float = setting(80.0, "fallback check: WARNING at this % of Redis maxmemory")
    check_crit_memory: float = setting(90.0, "fallback check: CRITICAL at this % of Redis maxmemory")

    def public_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                # A URL keeps its host (useful in logs); any other secret is hidden whole.
                value = redact_url(str(value)) if "://" in str(value) else "***"
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def redact_url(url: str) -> str:
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


_SIZE_UNITS = {"": 1, "b": 1, "k": KIB, "kb": KIB, "kib": KIB, "m": MIB, "mb": MIB, "mib": MIB,
               "g": 1024 * MIB, "gb": 1024 * MIB, "gib": 1024 * MIB}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 52428800, 50MiB, 512KiB)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 60, 90s, 10m, 5d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `Path` -> Path."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return typing.cast(type, hint)


def _convert(f: dataclasses.Field[Any], hint: Any, raw: Any) -> Any:
    if raw is None:
        return None
    base = _base_type(hint)
    unit = f.metadata.get("unit")
    if isinstance(raw, str):
        text = raw.strip()
        if text == "" and base is not str:
            return None
        if base is bool:
            if text.lower() in {"1", "true", "yes", "on"}:
                return True
            if text.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"not a boolean: {raw!r} (use true or false)")
        if unit == "bytes":
            return parse_size(text)
        if unit == "seconds":
            return parse_duration(text)
        if base is int:
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"not a whole number: {raw!r}")
            return int(text)
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"not a number: {raw!r}") from None
        if base is Path:
            return Path(text)
        return text
    if base in (int, float) and isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    if base is float and isinstance(raw, int):
        return float(raw)
    if base is Path and isinstance(raw, str | os.PathLike):
        return Path(raw)
    if base in (int, float, bool, str) and not isinstance(raw, base):
        raise ValueError(f"expected {base.__name__}, got {raw!r}")
    return raw


def _field_hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Defaults < TOML < FALLBACK_* env < flags; validated once."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    hints = _field_hints()
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_read_toml(Path(path), fields))

    for name in fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = (key, env[key])
    for name, raw in flags.items():
        if name in fields:
            values[name] = ("--" + name.replace("_", "-"), raw)

    converted: dict[str, Any] = {}
    for name, (source, raw) in values.items():
        try:
            converted[name] = _convert(fields[name], hints[name], raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    workers = converted.get("workers")
    if workers is not None and workers >= 0:
        # Shorthand for both process pools; a pool given on its own wins.
        converted.setdefault("smtp_workers", workers)
        converted.setdefault("web_workers", workers or os.cpu_count() or 1)
    settings = Settings(**converted)
    validate(settings)
    return settings


def _read_toml(path: Path, fields: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    out: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = (f"{path}: {key}", value)
    return out


_PORT_FIELDS = ("smtp_port", "http_port")
_POSITIVE_FIELDS = (
    "max_message_size", "max_recipients", "max_connections", "max_connections_per_ip",
    "max_commands", "connection_timeout", "idle_timeout", "directory_buckets",
    "imap_timeout", "reconcile_concurrency",
    "session_idle_timeout", "max_upload_size", "web_workers", "web_threads",
    "smarthost_timeout", "retry_base", "retry_max_interval", "retry_deadline", "claim_timeout",
    "max_crashes", "worker_concurrency", "replica_ack_timeout",
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def validate(s: Settings) -> None:
    """Fail fast on combinations no process could run with."""
    from fallback.passwords import HASHABLE_SCHEMES  # local: passwords imports heavy libraries

    for name in _PORT_FIELDS:
        port = getattr(s, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name}: {port} is not a port number (0-65535)")
    for name in _POSITIVE_FIELDS:
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    if s.workers is not None and s.workers < 0:
        raise ConfigError("workers: must be 0 (one per CPU) or more")
    if s.replica_acks < 0:
        raise ConfigError("replica_acks: must be 0 (no replica acknowledgement) or more")
    if s.smtp_workers < 0:
        raise ConfigError("smtp_workers: must be 0 (one per CPU) or more")
    _together(s, "tls_cert", "tls_key")
    _readable_files(s, "tls_cert", "tls_key")
    if s.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(f"log_level: {s.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    if s.password_scheme.upper() not in HASHABLE_SCHEMES:
        raise ConfigError(
            f"password_scheme: {s.password_scheme!r} is not one of {', '.join(HASHABLE_SCHEMES)}"
        )
    if s.redis_url is not None:
        if not re.match(r"^(redis|rediss|unix|redis\+cluster|redis\+sentinel)://", s.redis_url):
            raise ConfigError(
                f"redis_url: {redact_url(s.redis_url)!r} must start with redis://, rediss://, unix://, "
                "redis+cluster:// or redis+sentinel://"
            )
        from fallback.redisconn import parse_topology  # local: redisconn imports this module

        parse_topology(s.redis_url)
    if s.imap_url is not None and not re.match(r"^imaps?://[^/?#]+/?$", s.imap_url):
        raise ConfigError(f"imap_url: {s.imap_url!r} must look like imap://HOST:PORT or imaps://HOST:PORT")
    validate_outbound(s)
    validate_operations(s)


SMARTHOST_TLS = ("none", "starttls", "tls")


def parse_hostport(text: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPv6]:PORT" -> (host, port); ValueError saying what is wrong."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r}: {port} is not a port number (1-65535)")
    return host, int(port)


def parse_forward_to(text: str) -> tuple[str, str, int]:
    """"smtp://HOST:PORT" or "lmtp://HOST:PORT" -> (protocol, host, port); ValueError saying what is wrong."""
    m = re.fullmatch(r"(smtp|lmtp)://([^/?#]+)/?", text.strip())
    if not m:
        raise ValueError(f"{text!r} must look like smtp://HOST:PORT or lmtp://HOST:PORT")
    host, port = parse_hostport(m.group(2))
    return m.group(1), host, port


def validate_outbound(s: Settings) -> None:
    if s.smarthost is not None:
        try:
            parse_hostport(s.smarthost)
        except ValueError as exc:
            raise ConfigError(f"smarthost: {exc}") from None
    if s.smarthost_tls not in SMARTHOST_TLS:
        raise ConfigError(f"smarthost_tls: {s.smarthost_tls!r} is not one of {', '.join(SMARTHOST_TLS)}")
    _together(s, "smarthost_user", "smarthost_password_file")
    _readable_files(s, "smarthost_password_file", "smarthost_ca_file")
    _together(s, "dkim_selector", "dkim_key_dir")
    if s.dkim_key_dir is not None and not Path(s.dkim_key_dir).is_dir():
        raise ConfigError(f"dkim_key_dir: {s.dkim_key_dir} is not a directory")
    if s.dkim_selector is not None and not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})",
                                                        s.dkim_selector):
        raise ConfigError(f"dkim_selector: {s.dkim_selector!r} is not a DNS label")


def settings_table(flags: set[str] | None = None) -> str:
    """The README's configuration table, generated so docs and code cannot drift.

    `flags` is every option string the CLI accepts; a setting without one is
    shown as environment/TOML only (secrets, on purpose, have no flag).
    """
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = "unset" if default is None else str(default)
        if f.metadata.get("unit") == "bytes" and isinstance(default, int):
            shown = f"{default // MIB} MiB" if default % MIB == 0 else str(default)
        flag = "--" + f.name.replace("_", "-")
        shown_flag = f"`{flag}`" if flags is None or flag in flags else "—"
        rows.append(
            f"| {shown_flag} | `{ENV_PREFIX}{f.name.upper()}` | {shown} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)


DEFAULT_SECRET_KEYS = ("", "change-me", "changeme", "secret", "dev", "demo")
MIN_SECRET_LENGTH = 32


def webmail_secret(s: Settings) -> str:
    """The webmail's secret key, from secret_key or secret_key_file; refuses a missing or default one.

    A guessable key would let anyone forge form tokens, so the webmail does not
    start without a real one; only demo mode (a throwaway local run) may go
    without, and `fallback up --demo` then makes a random one up.
    """
    value = s.secret_key
    if value is None and s.secret_key_file is not None:
        value = read_secret_file("secret_key_file", s.secret_key_file)
    if value is None or value.strip().lower() in DEFAULT_SECRET_KEYS:
        raise ConfigError(
            "secret_key: the webmail needs a secret key: set FALLBACK_SECRET_KEY or --secret-key-file "
            "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`), or run with --demo"
        )
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(f"secret_key: too short ({len(value)} characters, need {MIN_SECRET_LENGTH})")
    return value


def cookie_secure(s: Settings) -> bool:
    """Secure cookies unless explicitly turned off, or in demo mode on plain local HTTP."""
    return (not s.demo) if s.cookie_secure is None else s.cookie_secure


def settings_env(s: Settings) -> dict[str, str]:
    """The settings as FALLBACK_* variables, for a child process (gunicorn) to load again."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[ENV_PREFIX + f.name.upper()] = str(value)
    return out


def validate_operations(s: Settings) -> None:
    """Failover, DNS switch and check settings."""
    for name in ("failover_cache_ttl", "dns_low_ttl", "dns_timeout", "check_warn_queue_age",
                 "check_crit_queue_age", "metrics_flush_interval", "forward_alert_age", "forward_retry_base",
                 "forward_retry_max_interval", "forward_timeout"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    if s.forward_to is not None:
        try:
            parse_forward_to(s.forward_to)
        except ValueError as exc:
            raise ConfigError(f"forward_to: {exc}") from None
    if s.webmail_url is not None and not re.fullmatch(r"https?://[^\s/?#]+(?:[/?#]\S*)?", s.webmail_url):
        raise ConfigError(f"webmail_url: {s.webmail_url!r} must look like https://HOST/...")
    if s.notice_sender is not None:
        from fallback.directory import normalize_address  # local: directory imports redis

        try:
            normalize_address(s.notice_sender)
        except FallbackError as exc:
            raise ConfigError(f"notice_sender: {exc.reason}") from None
    if s.check_warn_queue_age > s.check_crit_queue_age:
        raise ConfigError("check_warn_queue_age: must not be above check_crit_queue_age")
    for name in ("check_warn_memory", "check_crit_memory"):
        if not 0 < getattr(s, name) <= 100:
            raise ConfigError(f"{name}: {getattr(s, name)} is not a percentage (0-100)")
    if s.check_warn_memory > s.check_crit_memory:
        raise ConfigError("check_warn_memory: must not be above check_crit_memory")
    _readable_files(s, "admin_token_file", "dns_tsig_key_file")


def _together(s: Settings, a: str, b: str) -> None:
    if (getattr(s, a) is None) != (getattr(s, b) is None):
        raise ConfigError(f"{a} and {b} must be given together")


def _readable_files(s: Settings, *names: str) -> None:
    for name in names:
        p = getattr(s, name)
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{name}: {p} is not a readable file")


def read_secret_file(setting: str, path: Path | str, keep_spaces: bool = False) -> str:
    """The text of a file holding a key, token or password, stripped of its line ends (and,
    unless `keep_spaces`, of surrounding whitespace); a one-line error naming the setting."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc}") from None
    return text.strip("\r\n") if keep_spaces else text.strip()


def admin_token(s: Settings) -> str | None:
    """The admin API's bearer token from admin_token or admin_token_file; None: the API is off."""
    value = s.admin_token
    if value is None and s.admin_token_file is not None:
        value = read_secret_file("admin_token_file", s.admin_token_file)
    if value is not None and len(value) < 16:
        raise ConfigError(f"admin_token: too short ({len(value)} characters, need 16)")
    return value or None
