"""Validation of loaded settings: combinations no process could run with fail fast,
with a one-line `ConfigError` that names the setting."""

from __future__ import annotations

import re
from pathlib import Path

from fallback import maillog
from fallback.addresses import normalize_address
from fallback.config.limits import validate_limits
from fallback.config.redisurl import parse_topology, redact_url
from fallback.config.schema import HASHABLE_SCHEMES, Settings
from fallback.errors import ConfigError, FallbackError

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
    if not 0 <= s.undo_send_seconds <= 300:  # issue 15: longer and people think it was sent
        raise ConfigError("undo_send_seconds: must be 0 (no undo) to 300 seconds")
    if not 1 <= s.reconcile_append_batch <= 1000:  # issue 17: one command's bytes stay bounded
        raise ConfigError("reconcile_append_batch: must be 1 (one APPEND per message) to 1000")
    if not 1 <= s.reconcile_mailbox_connections <= 10:  # Dovecot's default per-user limit is 10
        raise ConfigError("reconcile_mailbox_connections: must be 1 to 10")
    if s.trace_retention < 0:  # issue 16: the message trace
        raise ConfigError("trace_retention: must be 0 (no trace) or more seconds (e.g. 14d)")
    if s.web_page_cache < 0:  # issue 17: web/pagecache.py
        raise ConfigError("web_page_cache: must be 0 (off) or more bytes (e.g. 32MiB)")
    if s.smtp_workers < 0:
        raise ConfigError("smtp_workers: must be 0 (one per CPU) or more")
    if s.event_loop not in ("uvloop", "asyncio"):  # issue 17: service.run
        raise ConfigError(f"event_loop: {s.event_loop!r} is not one of uvloop, asyncio")
    if s.store_compression not in ("zstd", "off"):  # issue 17: compression.CHOICES
        raise ConfigError(f"store_compression: {s.store_compression!r} is not one of zstd, off")
    _together(s, "tls_cert", "tls_key")
    _readable_files(s, "tls_cert", "tls_key")
    if s.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(f"log_level: {s.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    try:
        maillog.check_destination(s.mail_log)
    except ValueError as exc:
        raise ConfigError(f"mail_log: {exc}") from None
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
        parse_topology(s.redis_url)
    if s.imap_url is not None and not re.match(r"^imaps?://[^/?#]+/?$", s.imap_url):
        raise ConfigError(f"imap_url: {s.imap_url!r} must look like imap://HOST:PORT or imaps://HOST:PORT")
    validate_outbound(s)
    validate_operations(s)
    validate_limits(s)


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
        try:
            normalize_address(s.notice_sender)
        except FallbackError as exc:
            raise ConfigError(f"notice_sender: {exc.reason}") from None
    if s.postmaster_address is not None:  # Issue 14
        try:
            normalize_address(s.postmaster_address)
        except FallbackError as exc:
            raise ConfigError(f"postmaster_address: {exc.reason}") from None
    if any(c in s.recipient_delimiter for c in "@\"<>,;: \t"):  # Issue 14
        raise ConfigError(f"recipient_delimiter: {s.recipient_delimiter!r} holds a character "
                          "that cannot separate a subaddress")
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

