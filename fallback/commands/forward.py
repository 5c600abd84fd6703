"""The forward queue's flags, and the forward worker joining `fallback worker`.

`add_options` puts the flags (named after the Settings fields) on `fallback
up`, `fallback smtp` and `fallback worker`; whichever of them is given
--forward-to also runs the forward worker (fallback.forward).  `register`
extends the outbound worker's own subcommand from here, so that its module
(owned with the outbound queue) needs no change: with --forward-to,
`fallback worker` runs the outbound worker (if a smarthost is set) and the
forward worker side by side; without it, exactly what it did before.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
from dataclasses import replace
from typing import Any

from fallback.cli import Context, Handler
from fallback.redisconn import resolve_url
from fallback.service import Service


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("forward queue options (mail for users whose mailstore is not failed over)")
    g.add_argument("--forward-to", metavar="URL",
                   help="main system's next hop: smtp://HOST:PORT or lmtp://HOST:PORT "
                   "(FALLBACK_FORWARD_TO); unset: that mail waits in the forward queue")
    for name in ("forward-alert-age", "forward-retry-base", "forward-retry-max-interval", "forward-timeout"):
        g.add_argument(f"--{name}", metavar="SECONDS")


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    worker = sub.choices["worker"]
    add_options(worker)
    worker.set_defaults(handler=functools.partial(run_worker, worker.get_default("handler")))


def run_worker(outbound_only: Handler, ctx: Context, args: argparse.Namespace) -> int:
    if not ctx.settings.forward_to:
        return outbound_only(ctx, args)
    settings = replace(ctx.settings, redis_url=resolve_url(ctx.settings), demo=False)
    asyncio.run(Service(settings, roles=("worker", "forward")).run())
    return 0
