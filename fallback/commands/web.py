"""`fallback web`: the webmail alone (gunicorn), for deployments that scale it out."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from fallback.commands.context import Context
from fallback.redisconn import resolve_url
from fallback.service import check_demo_settings, check_no_demo_mailbox
from fallback.webserver import WebComponent


def register(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("web", parents=[parents["common"], parents["server"]],
                       help="run only the webmail (gunicorn) against a Redis that is already up")
    p.set_defaults(handler=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    check_demo_settings(ctx.settings)
    url = resolve_url(ctx.settings)
    check_no_demo_mailbox(ctx.settings, url)
    component = WebComponent(ctx.settings, url)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"fallback: {component.start_sync()}", flush=True)
    print("fallback: ready (Ctrl-C or SIGTERM to stop)", flush=True)
    process = component.process
    assert process is not None
    # Wake up now and then to notice gunicorn dying on its own (bounded: one check a second).
    while not stop.wait(1.0):
        if process.poll() is not None:
            print(f"fallback web: gunicorn exited with {process.returncode}", flush=True)
            return 1
    print("fallback: stopping", flush=True)
    component.stop_sync()
    return 0
