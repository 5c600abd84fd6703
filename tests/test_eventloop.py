"""The event loop `event_loop` names (fallback/eventloop.py): uvloop by default, asyncio's own on
request, and the receiver answering on either."""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import replace

import pytest
import redis
import uvloop

from fallback import eventloop, keys
from fallback.config import Settings
from tests.conftest import ReceiverThread


@pytest.mark.parametrize(("name", "kind"), [("uvloop", uvloop.Loop),
                                            ("asyncio", asyncio.SelectorEventLoop)])
def test_the_setting_picks_the_loop(settings: Settings, name: str, kind: type) -> None:
    chosen = replace(settings, event_loop=name)

    async def which() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    loop = eventloop.run(which(), chosen)
    assert type(loop) is kind
    assert loop.is_closed()  # run() closes what it made, as asyncio.run does


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_the_receiver_stores_on_either_loop(settings: Settings, mailboxes: list[str], name: str,
                                           r: redis.Redis) -> None:
    rx = ReceiverThread(replace(settings, event_loop=name)).start()
    try:
        assert type(rx.loop) is (uvloop.Loop if name == "uvloop" else asyncio.SelectorEventLoop)
        with smtplib.SMTP("127.0.0.1", rx.port) as smtp:
            smtp.sendmail("a@remote.test", [mailboxes[0]], f"Subject: on {name}\r\n\r\nbody\r\n")
    finally:
        rx.stop()
    assert r.zcard(keys.folder(mailboxes[0], "INBOX")) == 1
