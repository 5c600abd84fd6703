"""The limits against a hostile Internet, as the processes use them: trusted relay
networks, the memory reserve in bytes, and their validation."""

from __future__ import annotations

import ipaddress
import re

from fallback.config.schema import Settings
from fallback.config.secretfiles import metrics_token
from fallback.config.units import parse_size
from fallback.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str | None) -> tuple[Network, ...]:
    """"192.0.2.0/28, 2001:db8::1" -> networks; ValueError naming the bad entry."""
    out: list[Network] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an address or CIDR (e.g. 192.0.2.0/28)") from None
    return tuple(out)


def memory_reserve_bytes(reserve: str, maxmemory: int) -> int | None:
    """Redis used_memory at which intake stops taking new mail; None when there is no
    limit to take a share of (maxmemory 0 and a percentage)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", reserve)
    if m:
        return int(maxmemory * float(m.group(1)) / 100) if maxmemory > 0 else None
    return parse_size(reserve)


def validate_limits(s: Settings) -> None:
    try:
        parse_networks(s.trusted_relays)
    except ValueError as exc:
        raise ConfigError(f"trusted_relays: {exc}") from None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", s.memory_reserve)
    if m:
        if not 0 < float(m.group(1)) <= 100:
            raise ConfigError(f"memory_reserve: {s.memory_reserve!r} is not a percentage (0-100%)")
    else:
        try:
            parse_size(s.memory_reserve)
        except ValueError as exc:
            raise ConfigError(f"memory_reserve: {exc}; or a share of maxmemory such as 90%") from None
    for name in ("mailbox_quota", "max_messages_per_ip_per_minute", "min_data_rate", "send_limit_per_hour",
                 "send_limit_per_day"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name}: must be 0 (no limit) or more")
    for name in ("login_source_failures", "login_account_failures", "max_password_length",
                 "password_check_queue", "password_check_timeout", "session_max_age", "stress_idle_timeout",
                 "forward_dead_letter_after"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    if s.login_source_failures > s.login_account_failures:
        raise ConfigError("login_source_failures: must not be above login_account_failures")
    if s.metrics_token_file is not None and not s.metrics_token_file.is_file():
        raise ConfigError(f"metrics_token_file: {s.metrics_token_file} is not a readable file")
    metrics_token(s)  # readable and long enough: a bad one stops every process at start
