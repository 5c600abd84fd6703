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
from collections.abc import Sequence

import redis

from fallback import maillog
from fallback.commands import COMMANDS, registrar
from fallback.commands.context import Context, Handler, common_options, server_options
from fallback.config import Settings, load_settings, redact_url
from fallback.errors import ConfigError, FallbackError


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: when it names a command, only that command's module is loaded."""
    parser = argparse.ArgumentParser(
        prog="fallback",
        description="Emergency fallback mailbox service: durable SMTP intake, webmail, reconcile.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = {"common": common_options(), "server": server_options()}
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else COMMANDS
    for command in chosen:
        registrar(command)(sub, parents)
    return parser


def setup_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    # No format of ours shows where a call was made, its thread or its multiprocessing name:
    # not collecting them is the logging HOWTO's "Optimization" (a third of a mail-log line's
    # cost, one line per message received).  The PID stays: syslog's tag shows it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(maillog.LineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[stderr])
    mail = logging.getLogger(maillog.LOGGER_NAME)
    try:
        handler = maillog.handler(settings.mail_log)  # a file, syslog, or None: stderr
    except OSError as exc:
        raise ConfigError(f"mail_log: cannot open {settings.mail_log}: {exc.strerror or exc}") from None
    if handler is not None:
        mail.addHandler(handler)
        mail.propagate = False
    # Library chatter (one line per SMTP command) would drown the mail log.
    logging.getLogger("mail.log").setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
