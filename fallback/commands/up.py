"""`fallback up`: run the whole service on one machine."""

from __future__ import annotations

import argparse
from typing import Any

from fallback.commands import forward, worker
from fallback.commands.context import Context
from fallback.eventloop import run as run_loop
from fallback.service import Service


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", parents=[parents["common"], parents["server"], worker.options()],
                       help="run everything on one machine (embedded Redis unless --redis-url)")
    forward.add_options(p)
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    run_loop(Service(ctx.settings).run(), ctx.settings)
    return 0
