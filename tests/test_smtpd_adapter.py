"""Contract: what fallback/intake/smtpd_adapter.py (and its command loop, smtpd_loop.py) relies
on still exists in the installed aiosmtpd.

Each name in RELIES_ON is checked on aiosmtpd itself (not on our subclass),
instance attributes on a real connection, and aiosmtpd's reply to an
over-size SIZE= is checked word for word against the text the adapter
rewrites.  An aiosmtpd upgrade that breaks the adapter fails here, naming
what went missing.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiosmtpd.smtp
import pytest

from fallback.intake import smtpd_adapter, smtpd_loop
from fallback.intake.smtpd_adapter import RELIES_ON, SIZE_REPLY

ADAPTER = "fallback/intake/smtpd_adapter.py"
LOOP = "fallback/intake/smtpd_loop.py"
AIOSMTPD = f"aiosmtpd {version('aiosmtpd')}"
LIMIT = 100


def missing(name: str) -> str:
    return f"{AIOSMTPD} has no {name}, which {ADAPTER} relies on (RELIES_ON): adapt the adapter"


class Handler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def _dialogue() -> tuple[set[str], bytes]:
    """A real connection to aiosmtpd's own SMTP: its attributes once connected, and its reply to
    MAIL FROM with SIZE= over data_size_limit."""
    made: list[aiosmtpd.smtp.SMTP] = []

    def factory() -> aiosmtpd.smtp.SMTP:
        made.append(aiosmtpd.smtp.SMTP(Handler(), hostname="contract.test", data_size_limit=LIMIT,
                                       command_call_limit=LIMIT, loop=asyncio.get_running_loop()))
        return made[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()  # the greeting
        writer.write(b"EHLO client.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(f"MAIL FROM:<a@example.com> SIZE={LIMIT + 1}\r\n".encode())
        reply = (await reader.readline()).rstrip(b"\r\n")
        names = set(dir(made[0]))
        writer.write(b"QUIT\r\n")
        await reader.readline()
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
    return names, reply


@pytest.fixture(scope="module")
def connected() -> tuple[set[str], bytes]:
    return asyncio.run(asyncio.wait_for(_dialogue(), 10))


def test_relies_on_is_well_formed() -> None:
    assert len(set(RELIES_ON)) == len(RELIES_ON)
    form = re.compile(r"aiosmtpd\.smtp\.\w+|SMTP\(\w+=\)|(SMTP|Envelope|Session)(\(\))?\.\w+")
    assert [n for n in RELIES_ON if not form.fullmatch(n)] == []


@pytest.mark.parametrize("name", RELIES_ON)
def test_aiosmtpd_still_has(name: str, connected: tuple[set[str], bytes]) -> None:
    instance_names, _ = connected
    if name.startswith("aiosmtpd.smtp."):
        assert hasattr(aiosmtpd.smtp, name.rpartition(".")[2]), missing(name)
    elif m := re.fullmatch(r"SMTP\((\w+)=\)", name):
        assert m[1] in inspect.signature(aiosmtpd.smtp.SMTP.__init__).parameters, missing(name)
    elif name.startswith("SMTP()."):
        assert name.partition(".")[2] in instance_names, missing(name)
    elif name.startswith("SMTP."):
        assert hasattr(aiosmtpd.smtp.SMTP, name.partition(".")[2]), missing(name)
    elif name.startswith("Envelope()."):
        assert hasattr(aiosmtpd.smtp.Envelope(), name.partition(".")[2]), missing(name)
    else:
        assert name.startswith("Session().")
        loop = asyncio.new_event_loop()
        try:
            assert hasattr(aiosmtpd.smtp.Session(loop), name.partition(".")[2]), missing(name)
        finally:
            loop.close()


def test_size_reply_is_still_aiosmtpds_exact_text(connected: tuple[set[str], bytes]) -> None:
    _, reply = connected
    assert reply.decode() == SIZE_REPLY, (
        f"{AIOSMTPD} answers an over-size SIZE= with {reply!r}, not {SIZE_REPLY!r}; {ADAPTER} "
        "rewrites that exact text into 552 5.3.4 and logs it: update SIZE_REPLY")


def test_only_the_adapter_imports_aiosmtpd() -> None:
    package = Path(smtpd_adapter.__file__).parents[1]
    users = sorted(str(p.relative_to(package.parent)) for p in package.rglob("*.py")
                   if re.search(r"^\s*(from|import) aiosmtpd", p.read_text(), re.M))
    assert users == [ADAPTER, LOOP], f"aiosmtpd is imported outside {ADAPTER} and {LOOP}: {users}"


@pytest.mark.parametrize("module", [smtpd_adapter, smtpd_loop])
def test_every_private_name_the_adapter_uses_is_declared(module: Any) -> None:
    source = Path(module.__file__).read_text()
    used = set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)", source))
    own = set(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=\n]+)?=[^=]", source))
    own |= set(re.findall(r"def (_[a-z]\w*)", source)) - {n.rpartition(".")[2] for n in RELIES_ON}
    declared = {n.rpartition(".")[2] for n in RELIES_ON if n.startswith(("SMTP.", "SMTP()."))}
    assert sorted(used - own - declared) == [], f"{ADAPTER} uses aiosmtpd names missing from RELIES_ON"
