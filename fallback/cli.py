"""The `fallback` command line: parsing, settings, and errors as one line.

Each subcommand lives in `fallback/commands/<name>.py` with a `register`
function; this module builds the parser from them, loads the settings once
(flags > FALLBACK_* env > TOML > defaults) and turns every failure into one
line on stderr and a non-zero exit.  No traceback reaches the operator unless
`--debug` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Console

from fallback.config import Settings, load_settings, redact_url
from fallback.errors import FallbackError

Handler = Callable[["Context", argparse.Namespace], int]


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
        return Directory(r, ensure_buckets(r, self.settings.directory_buckets))


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
        ("mail-log", "FILE"), ("smtp-workers", "N"), ("workers", "N"), ("replica-acks", "N"),
        ("replica-ack-timeout", "SECONDS"),
        # The webmail (secret_key itself only by environment or TOML: flags show in `ps`).
        ("secret-key-file", "FILE"), ("session-idle-timeout", "SECONDS"), ("cookie-secure", "BOOL"),
        ("max-upload-size", "SIZE"), ("incident-message", "TEXT"), ("web-workers", "N"),
        ("web-threads", "N"),
    ):
        g.add_argument(f"--{name}", metavar=metavar)
    g.add_argument("--demo", action="store_true", default=None,
                   help="provision a demo mailbox (demo@example.com / demo)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from fallback.commands import REGISTRY

    parser = argparse.ArgumentParser(
        prog="fallback",
        description="Emergency fallback mailbox service: durable SMTP intake, webmail, reconcile.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = {"common": common_options(), "server": server_options()}
    for register in REGISTRY:
        register(sub, parents)
    return parser


def setup_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mail = logging.getLogger("fallback.mail")
    if settings.mail_log != "-":
        handler = logging.FileHandler(settings.mail_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        mail.addHandler(handler)
        mail.propagate = False
    # Library chatter (one line per SMTP command) would drown the mail log.
    logging.getLogger("mail.log").setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    # A subcommand may fail with another status: `check` is a Nagios plugin (3 = UNKNOWN).
    failed: int = getattr(args, "failure_exit", 1)
    try:
        settings = load_settings(vars(args))
        setup_logging(settings)
        handler: Handler = args.handler
        return handler(Context(settings), args)
    except FallbackError as exc:
        print(f"fallback {args.command}: {exc.reason}", file=sys.stderr)
        return failed
    except redis.RedisError as exc:
        print(f"fallback {args.command}: Redis error: {redact_url(str(exc))}", file=sys.stderr)
        return failed
    except KeyboardInterrupt:
        print(f"fallback {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:
        if debug:
            raise
        print(f"fallback {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(run again with --debug for details)", file=sys.stderr)
        return failed
