"""What every subcommand shares: its `Context` (settings and lazily made clients) and the
option groups that several subcommands take (common, server)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from fallback.config import Settings
from fallback.config.units import parse_duration
from fallback.errors import InputError

Handler = Callable[["Context", argparse.Namespace], int]
LIMIT_POSITIVE = "--limit must be greater than 0"


def duration_option(value: str | None, flag: str) -> float | None:
    """A duration flag's seconds (None when it was not given); a bad one is refused naming it."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InputError(f"{flag}: {exc}") from None


def check_limit(limit: int) -> None:
    """--limit N of the listings: N must be 1 or more."""
    if limit <= 0:
        raise InputError(LIMIT_POSITIVE)


@dataclass
class Context:
    """What a subcommand needs: the settings and lazily made clients."""

    settings: Settings
    console: Console = field(default_factory=lambda: Console(stderr=False, highlight=False))
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))
    _redis: redis.Redis | None = None

    def redis(self) -> redis.Redis:
        if self._redis is None:
            from fallback.redisconn import connect

            self._redis = connect(self.settings)
        return self._redis

    def directory(self) -> Any:
        from fallback.mailbox.directory import Directory, ensure_buckets

        r = self.redis()
        return Directory(r, ensure_buckets(r, self.settings.directory_buckets),
                         name_index=self.settings.contacts_directory)


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--config", metavar="FILE", help="TOML settings file (FALLBACK_CONFIG)")
    g.add_argument("--redis-url", metavar="URL", help="Redis URL (FALLBACK_REDIS_URL); "
                   "default: the embedded Redis of `fallback up` in --data-dir")
    g.add_argument("--data-dir", metavar="DIR", help="data directory (FALLBACK_DATA_DIR, "
                   "default ./fallback-data)")
    g.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    g.add_argument("--debug", action="store_true", default=None,
                   help="show tracebacks of unexpected errors")
    return p


def server_options() -> argparse.ArgumentParser:
    """Flags of the long-running processes, named after the Settings fields."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server options")
    for name, metavar in (
        ("hostname", "NAME"), ("smtp-host", "ADDR"), ("smtp-port", "N"), ("http-host", "ADDR"),
        ("http-port", "N"), ("max-message-size", "SIZE"), ("max-recipients", "N"),
        ("max-connections", "N"), ("max-connections-per-ip", "N"), ("max-commands", "N"),
        ("connection-timeout", "SECONDS"), ("idle-timeout", "SECONDS"), ("tls-cert", "PEM"),
        ("tls-key", "PEM"), ("redis-server", "PATH"), ("redis-maxmemory", "BYTES"),
        ("mail-log", "DEST"), ("smtp-workers", "N"), ("workers", "N"), ("replica-acks", "N"),
        ("replica-ack-timeout", "SECONDS"),
        # The webmail (secret_key itself only by environment or TOML: flags show in `ps`).
        ("secret-key-file", "FILE"), ("session-idle-timeout", "SECONDS"), ("cookie-secure", "BOOL"),
        ("max-upload-size", "SIZE"), ("incident-message", "TEXT"), ("web-workers", "N"),
        ("web-threads", "N"), ("web-page-cache", "SIZE"),
        # Limits against a hostile Internet.
        ("mailbox-quota", "SIZE"), ("memory-reserve", "PERCENT|SIZE"), ("trusted-relays", "CIDR,..."),
        ("max-messages-per-ip-per-minute", "N"), ("stress-idle-timeout", "SECONDS"),
        ("min-data-rate", "BYTES"), ("login-source-failures", "N"),
        ("login-account-failures", "N"), ("max-password-length", "N"), ("password-check-queue", "N"),
        ("password-check-timeout", "SECONDS"), ("session-max-age", "SECONDS"),
        ("send-limit-per-hour", "N"), ("send-limit-per-day", "N"), ("metrics-token-file", "FILE"),
        # Issue 14: addresses besides mailboxes.
        ("recipient-delimiter", "CHARS"), ("postmaster-address", "ADDRESS"),
        # Issue 15: undo send.
        ("undo-send-seconds", "SECONDS"),
        # Issue 15: address suggestions.
        ("contacts-directory", "BOOL"),
        # Issue 15: live incident text.
        ("status-show-scope", "BOOL"),
        # Issue 16: the message trace.
        ("trace-retention", "SECONDS"),
        # Issue 17: stored messages compressed; the event loop.
        ("store-compression", "zstd|off"), ("event-loop", "uvloop|asyncio"),
    ):
        g.add_argument(f"--{name}", metavar=metavar)
    g.add_argument("--demo", action="store_true", default=None,
                   help="provision a demo mailbox (demo@example.com / demo)")
    return p


def columns_table(title: str, columns: tuple[tuple[str, str], ...], fold: bool = True) -> Table:
    """A listing's table: (name, "left"|"right") columns; long cells fold rather than cut."""
    table = Table(title=title)
    for col, just in columns:
        table.add_column(col, justify=just, overflow="fold" if fold else "ellipsis")  # type: ignore[arg-type]
    return table
