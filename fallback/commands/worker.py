"""`fallback worker`: the outbound worker on its own; `options()` are its flags (also `fallback up`'s)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from dataclasses import replace
from typing import Any

from fallback.commands import forward
from fallback.commands.context import Context
from fallback.config import SMARTHOST_TLS
from fallback.errors import ConfigError
from fallback.eventloop import run as run_loop
from fallback.ops import metrics
from fallback.ops.trace import TraceBuffer
from fallback.redisconn import async_client, resolve_url


def options() -> argparse.ArgumentParser:
    """The worker's flags, named after the Settings fields (shared with `fallback up`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("outbound delivery options")
    g.add_argument("--smarthost", metavar="HOST:PORT",
                   help="relay for sent mail (FALLBACK_SMARTHOST); unset: sent mail stays queued")
    g.add_argument("--smarthost-tls", choices=SMARTHOST_TLS,
                   help="TLS to the smarthost (default starttls)")
    g.add_argument("--smarthost-user", metavar="USER", help="SMTP AUTH user at the smarthost")
    g.add_argument("--smarthost-password-file", metavar="FILE", help="file holding the AUTH password")
    g.add_argument("--smarthost-ca-file", metavar="PEM",
                   help="CA bundle for the smarthost's certificate (default: the system's)")
    for name, metavar in (
        ("smarthost-timeout", "SECONDS"), ("retry-base", "SECONDS"), ("retry-max-interval", "SECONDS"),
        ("retry-deadline", "DURATION"), ("claim-timeout", "SECONDS"), ("max-crashes", "N"),
        ("worker-concurrency", "N"), ("dkim-selector", "SELECTOR"), ("dkim-key-dir", "DIR"),
    ):
        g.add_argument(f"--{name}", metavar=metavar)
    return p


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", parents=[parents["common"], options()],
                       help="deliver sent mail from the outbound queue through the smarthost")
    p.add_argument("--hostname", metavar="NAME", help="name in EHLO and in failure notices")
    p.add_argument("--mail-log", metavar="DEST", help="mail log destination: - (stderr, the default), "
                   "syslog, syslog:/path/to/socket, syslog:HOST:PORT or a file")
    forward.add_options(p)
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    settings = ctx.settings
    if settings.forward_to:
        # Both queues: the outbound worker (off without a smarthost) beside the forward worker.
        from fallback.service import Service

        settings = replace(settings, redis_url=resolve_url(settings), demo=False)
        run_loop(Service(settings, roles=("worker", "forward")).run(), settings)
        return 0
    if not settings.smarthost:
        raise ConfigError("smarthost: not set; give --smarthost HOST:PORT (or FALLBACK_SMARTHOST)")
    if settings.hostname is None:
        settings = replace(settings, hostname=socket.gethostname())
    run_loop(_serve(settings), settings)
    return 0


async def _serve(settings: Any) -> None:
    from fallback.queues import worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    r = async_client(resolve_url(settings))
    try:
        await r.ping()
        await worker.run(settings, r, stop, *metrics.mail_counting(
            settings.metrics_flush_interval, TraceBuffer.for_settings(settings, "outbound")))
    finally:
        await r.aclose()
