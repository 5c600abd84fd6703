"""The aioimaplib adapter: its contract with the installed aioimaplib, and its work against real Dovecot.

The contract tests fail, by name, when an aioimaplib upgrade moves one of the
internals fallback/reconcile/imap_adapter.py relies on (its RELIES_ON), and
when the adapter starts using one it does not declare.  The functional tests
run the LITERAL+ APPEND and the lost-connection path against the private
Dovecot the other reconcile tests use (through the cutting proxy of
tests/reconcile_helpers.py for the second).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import inspect
import time
from collections.abc import Callable
from typing import Any

import aioimaplib
import pytest

from fallback.reconcile import imap_adapter as adapter
from fallback.reconcile.imap import ConnectionLost, ImapTarget, Session, quote
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer, MainStoreView
from tests.reconcile_helpers import CuttingProxy, message
from tests.servers import free_port

ALICE = "alice@example.com"
HINT = "fallback/reconcile/imap_adapter.py needs updating"


async def _samples() -> dict[str, Any]:
    """One instance of each aioimaplib class the adapter touches (attributes are set in __init__)."""
    loop = asyncio.get_running_loop()
    client = aioimaplib.IMAP4("127.0.0.1", free_port(), timeout=1)
    with contextlib.suppress(Exception):   # nothing listens there: only the object is wanted
        await client.wait_hello_from_server()
    return {"IMAP4": client, "IMAP4ClientProtocol": aioimaplib.IMAP4ClientProtocol(loop),
            "Command": aioimaplib.Command("NOOP", "A1", loop=loop)}


def _missing(reliance: adapter.Reliance, samples: dict[str, Any]) -> list[str]:
    if reliance.owner == "aioimaplib":
        if not hasattr(aioimaplib, reliance.name):
            return [f"aioimaplib has no attribute {reliance.name!r}"]
        value = getattr(aioimaplib, reliance.name)
        if reliance.kind == "class" and not inspect.isclass(value):
            return [f"aioimaplib.{reliance.name} is no longer a class"]
        return []
    cls = getattr(aioimaplib, reliance.owner, None)
    if cls is None:
        return [f"aioimaplib has no attribute {reliance.owner!r}"]
    where = f"aioimaplib.{reliance.owner}"
    if reliance.kind == "attribute":
        ok = hasattr(samples[reliance.owner], reliance.name)
        return [] if ok else [f"{where} has no attribute {reliance.name!r}"]
    method = getattr(cls, reliance.name, None)
    if not callable(method):
        return [f"{where} has no method {reliance.name!r}"]
    params = inspect.signature(method).parameters
    return [f"{where}.{reliance.name} has no parameter {p!r}" for p in reliance.params if p not in params]


def test_installed_aioimaplib_has_everything_the_adapter_relies_on() -> None:
    samples = asyncio.run(_samples())
    problems = [p for reliance in adapter.RELIES_ON for p in _missing(reliance, samples)]
    assert not problems, "\n".join(f"{p}: {HINT}" for p in problems)


def test_installed_aioimaplib_is_the_pinned_major_version() -> None:
    version = importlib.metadata.version("aioimaplib")
    assert version.split(".")[0] == "2", f"aioimaplib {version} installed, the adapter is for 2.x: {HINT}"


def test_adapter_declares_every_aioimaplib_name_it_uses() -> None:
    """Names read off aioimaplib objects in the adapter's source must all be in RELIES_ON."""
    tree = ast.parse(inspect.getsource(adapter))
    used: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        on_module_or_local = isinstance(value, ast.Name) and value.id in ("aioimaplib", "proto", "cmd")
        on_protocol = isinstance(value, ast.Attribute) and value.attr == "protocol"
        if on_module_or_local or on_protocol or node.attr == "protocol":
            used.add(node.attr)
    declared = {r.name for r in adapter.RELIES_ON}
    assert used - declared == set(), f"used but not in RELIES_ON: {sorted(used - declared)}"


def test_continuation_sends_literal_data_for_an_append_whatever_its_marker() -> None:
    """What adapter.append_literal8 relies on: on "+", a pending APPEND gets `literal_data` and CRLF.

    (The round trip through Dovecot is tests/test_reconcile_binary.py, literal8-sync.)
    """
    class Wire:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data: bytes) -> None:
            self.data.extend(data)

    async def go() -> bytes:
        loop = asyncio.get_running_loop()
        proto = aioimaplib.IMAP4ClientProtocol(loop)
        wire = Wire()
        proto.transport = wire  # type: ignore[assignment]
        proto.pending_sync_command = aioimaplib.Command("APPEND", "A1", '"INBOX"', "~{3}", loop=loop)
        proto.literal_data = b"a\0b"
        proto._continuation(b"+ OK")
        return bytes(wire.data)

    assert asyncio.run(go()) == b"a\0b\r\n", HINT


def test_a_missing_name_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """What an upgrade that drops Command._event would print."""
    samples = asyncio.run(_samples())
    del samples["Command"]._event
    [problem] = _missing(adapter.Reliance("Command", "_event", "attribute"), samples)
    assert problem == "aioimaplib.Command has no attribute '_event'"
    monkeypatch.delattr(aioimaplib.IMAP4ClientProtocol, "new_tag")
    [problem] = _missing(adapter.Reliance("IMAP4ClientProtocol", "new_tag", "method"), samples)
    assert problem == "aioimaplib.IMAP4ClientProtocol has no method 'new_tag'"


# -- against Dovecot ----------------------------------------------------------------------------

def _session(url: str, timeout: float = 30.0) -> Any:
    return Session.open(ImapTarget.from_url(url, timeout), ALICE, MASTER_USER, MASTER_PASSWORD)


def _run(coro: Callable[[], Any]) -> Any:
    return asyncio.run(coro())


@pytest.mark.dovecot
def test_literal_plus_append_round_trips_the_bytes(dovecot_factory: Callable[..., DovecotServer]) -> None:
    server = dovecot_factory([ALICE])
    # Bytes that would trip a framing mistake: 8-bit text, a literal marker, a line that
    # looks like a tagged reply, a bare dot line, a long line, no final CRLF.
    body = b"{12}\r\nA1 OK done\r\n.\r\n" + b"x" * 990 + b"\r\n\xc3\xa9t\xc3\xa9"
    _, raw = message(ALICE, "Café", body=body, extra=b"X-Note: 8-bit \xe2\x82\xac\r\n")
    _, raw2 = message(ALICE, "second")
    when = dt.datetime(2026, 11, 23, 10, 0, 0, tzinfo=dt.UTC)

    async def go() -> tuple[Any, tuple[int | None, int | None]]:
        async with await _session(server.url) as s:
            assert s.has("LITERAL+") and adapter.no_command_pending(s.client)
            response = await adapter.append_literal_plus(
                s.client, quote("INBOX"), "(\\Seen)", aioimaplib.time2internaldate(when), raw, 30.0)
            # Session.append takes the same path when nothing else is in flight.
            return response, await s.append("INBOX", raw2, ["\\Flagged"], int(when.timestamp() * 1000))

    response, (validity, uid) = _run(go)
    assert response.result == "OK" and b"APPENDUID" in b" ".join(bytes(x) for x in response.lines)
    assert validity is not None and uid == 2
    view = MainStoreView(server, ALICE)
    got = view.messages("INBOX")
    view.close()
    assert [m["raw"] for m in got] == [raw, raw2]
    assert got[0]["flags"] - {"\\Recent"} == {"\\Seen"} and got[1]["flags"] - {"\\Recent"} == {"\\Flagged"}
    assert time.mktime(got[0]["date"]) == when.timestamp()


@pytest.mark.dovecot
def test_connection_killed_mid_command_fails_it_at_once(
        dovecot_factory: Callable[..., DovecotServer]) -> None:
    """The socket dies under an APPEND: the command fails now, not at its 60 s timeout.

    The engine's view of the same fault (state left `appending`, found by id next run) is
    test_reconcile_faults.test_connection_dropped_mid_append.
    """
    server = dovecot_factory([ALICE])
    proxy = CuttingProxy(server.port, nth=1, mode="literal").start()
    _, raw = message(ALICE, "cut", body=b"y" * 5000)

    async def go() -> tuple[str, float, str]:
        async with await _session(proxy.url, timeout=60.0) as s:
            started = time.monotonic()
            with pytest.raises(ConnectionLost) as lost:
                await s.append("INBOX", raw, [], int(time.time() * 1000))
            took = time.monotonic() - started
            with pytest.raises(ConnectionLost) as after:   # and the next command does not even try
                await s.select("INBOX")
            return lost.value.reason, took, after.value.reason

    try:
        reason, took, after = _run(go)
    finally:
        proxy.stop()
    assert proxy.fired
    assert reason.startswith("APPEND: connection closed") and took < 10, (reason, took)
    assert after.startswith("SELECT: connection closed")
