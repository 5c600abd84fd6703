"""The event loop the long-running processes run on: `event_loop` (uvloop or asyncio's own)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fallback.config import Settings

T = TypeVar("T")


def new_event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    """The loop `event_loop` names.  uvloop does in C what asyncio's selector loop does in Python
    for every connection (accept, transport, reads, writes, timers): with a new connection per
    message that is about a tenth of the receiver's CPU (docs/performance.md, issue 17)."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """asyncio.run on the configured event loop (`fallback up`, `smtp`, `worker`)."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(settings)) as runner:
        return runner.run(main)
