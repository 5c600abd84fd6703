"""`fallback smtp`: the SMTP receiver alone, for deployments that scale it out.

Same receiver as `fallback up` (fallback.service), without the webmail and
the worker and without starting an embedded Redis: it joins the configured
Redis (or the embedded one a `fallback up` runs in the same --data-dir).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
from dataclasses import replace
from typing import Any

from fallback.commands import forward
from fallback.commands.context import Context
from fallback.eventloop import run as run_loop
from fallback.redisconn import resolve_url
from fallback.service import PARENT_ENV, Service, check_demo_settings


def follow_parent(pid: int) -> None:
    """A receiver started by another one (smtp_workers) ends with it, even if it was SIGKILLed:
    the kernel sends SIGTERM on the parent's death, which stops this one cleanly."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != pid:  # it died before prctl took effect
        raise SystemExit(0)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("smtp", parents=[parents["common"], parents["server"]],
                       help="run only the SMTP receiver against a Redis that is already up")
    forward.add_options(p)  # with --forward-to it also runs the forward worker
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is not None:
        follow_parent(int(parent))
    # resolve_url refuses (one line) when there is no Redis to join, instead of starting one.
    check_demo_settings(ctx.settings)  # before looking for a Redis: the reason is the setting
    settings = replace(ctx.settings, redis_url=resolve_url(ctx.settings))
    run_loop(Service(settings, roles=("smtp", "forward") if settings.forward_to else ("smtp",)).run(),
             settings)
    return 0
