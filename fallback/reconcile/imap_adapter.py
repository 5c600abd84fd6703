"""Every touch of aioimaplib 2.x internals, in one place (the pin is in pyproject.toml).

aioimaplib's public client (`IMAP4`) lacks three things reconcile needs, so
this module reaches under it, into `IMAP4ClientProtocol` and `Command`:

- Failing commands at once when the socket dies.  aioimaplib calls
  `conn_lost_cb` but leaves every pending command waiting for its timeout;
  an APPEND in flight must end now as "outcome unknown".  Needs the
  protocol's `pending_sync_command` / `pending_async_commands` and a
  command's `_event`, `_exception` and `close()`.
- Commands the client has no method for, or builds differently: LOGIN with a
  quoted user (the master login `user*master`), AUTHENTICATE PLAIN, SELECT /
  EXAMINE that keep the UIDVALIDITY reply, UID EXPUNGE.  Needs `Command(...)`
  with `new_tag()` and the protocol's loop, `execute(cmd, scrub=...)`, and
  setting `state` (AUTH / SELECTED) and `capabilities` as its own methods do.
- APPEND with a LITERAL+ literal (RFC 7888), which aioimaplib does not
  speak: the command and the message go out in one write, registered as the
  pending sync command the way `execute` registers one; LOGOUT without
  waiting for the goodbye.  Needs `transport.write()` / `close()`.
- MULTIAPPEND (RFC 3502): several messages in one APPEND command, each a
  LITERAL+ literal, written at once and registered the same way.
- APPEND with a literal8 (`~{N}`, RFC 3516 BINARY) for a message holding NUL
  bytes: in the LITERAL+ write above, or, without LITERAL+, as a synchronizing
  literal that aioimaplib's continuation handler sends on the server's "+"
  (it sends the protocol's `literal_data` for any pending APPEND, whatever
  marker the command line carries).  Needs `literal_data` and `_continuation`.

`RELIES_ON` names each of these; tests/test_imap_adapter.py checks them
against the installed aioimaplib, so an upgrade that moves one fails there,
by name, rather than in the middle of an outage.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aioimaplib


@dataclass(frozen=True)
class Reliance:
    """One name this module uses: `owner` is "aioimaplib" or a class of it.

    kind: "attribute" (on an instance: set in __init__), "method" (callable, with at
    least `params`), "class" or "constant" (module level).
    """

    owner: str
    name: str
    kind: str
    params: tuple[str, ...] = ()


RELIES_ON: tuple[Reliance, ...] = (
    Reliance("aioimaplib", "IMAP4", "class"),
    Reliance("aioimaplib", "Command", "class"),
    Reliance("aioimaplib", "IMAP4ClientProtocol", "class"),
    Reliance("aioimaplib", "CommandTimeout", "class"),
    Reliance("aioimaplib", "AUTH", "constant"),
    Reliance("aioimaplib", "SELECTED", "constant"),
    Reliance("IMAP4", "protocol", "attribute"),
    Reliance("IMAP4ClientProtocol", "conn_lost_cb", "attribute"),
    Reliance("IMAP4ClientProtocol", "pending_sync_command", "attribute"),
    Reliance("IMAP4ClientProtocol", "pending_async_commands", "attribute"),
    Reliance("IMAP4ClientProtocol", "loop", "attribute"),
    Reliance("IMAP4ClientProtocol", "state", "attribute"),
    Reliance("IMAP4ClientProtocol", "capabilities", "attribute"),
    Reliance("IMAP4ClientProtocol", "transport", "attribute"),
    Reliance("IMAP4ClientProtocol", "new_tag", "method"),
    Reliance("IMAP4ClientProtocol", "execute", "method", ("command", "scrub")),
    Reliance("IMAP4ClientProtocol", "capability", "method"),
    Reliance("IMAP4ClientProtocol", "literal_data", "attribute"),
    Reliance("IMAP4ClientProtocol", "_continuation", "method", ("line",)),
    Reliance("Command", "__init__", "method", ("name", "tag", "args", "prefix", "loop", "timeout")),
    Reliance("Command", "_event", "attribute"),
    Reliance("Command", "_exception", "attribute"),
    Reliance("Command", "close", "method", ("line", "result")),
    Reliance("Command", "wait", "method"),
    Reliance("Command", "response", "attribute"),
)


# -- the connection ---------------------------------------------------------------------------

def set_lost_callback(client: aioimaplib.IMAP4, callback: Callable[[Exception | None], None]) -> None:
    """What IMAP4(conn_lost_cb=...) does, for IMAP4_SSL, which takes no such argument."""
    client.protocol.conn_lost_cb = callback


def fail_pending(client: aioimaplib.IMAP4, error: Callable[[], Exception]) -> None:
    """Wake every command still waiting for its reply, raising `error()` in it."""
    proto = client.protocol
    if proto is None:
        return
    for cmd in [proto.pending_sync_command, *proto.pending_async_commands.values()]:
        if cmd is not None and not cmd._event.is_set():
            cmd._exception = error()
            cmd.close(b"connection closed", "BYE")


def no_command_pending(client: aioimaplib.IMAP4) -> bool:
    """Nothing in flight: a raw write cannot interleave with another command's."""
    proto = client.protocol
    return proto.pending_sync_command is None and not proto.pending_async_commands


def new_tag(client: aioimaplib.IMAP4) -> str:
    return str(client.protocol.new_tag())


def write_raw(client: aioimaplib.IMAP4, data: bytes) -> None:
    """Bytes straight onto the socket (no-op before it is connected)."""
    transport = client.protocol.transport
    if transport is not None:
        transport.write(data)


def drop_connection(client: aioimaplib.IMAP4) -> None:
    """Close the socket without a goodbye."""
    transport = client.protocol.transport
    if transport is not None:
        transport.close()


# -- commands ---------------------------------------------------------------------------------

def command(client: aioimaplib.IMAP4, verb: str, *args: str, prefix: str | None = None,
            timeout: float | None = None) -> aioimaplib.Command:
    """A command with the session's next tag, as aioimaplib's own methods build one."""
    proto = client.protocol
    return aioimaplib.Command(verb, proto.new_tag(), *args, prefix=prefix, loop=proto.loop,
                              timeout=timeout)


def execute(client: aioimaplib.IMAP4, cmd: aioimaplib.Command,
            scrub: str | None = None) -> Coroutine[Any, Any, Any]:
    """Sends `cmd` and waits for its tagged reply (an aioimaplib Response) when awaited.

    `scrub` (a password) is masked in aioimaplib's debug log.  The coroutine itself, not
    a wrapper: the caller may close it unawaited, and the hot path saves a frame.
    """
    return client.protocol.execute(cmd, scrub=scrub)


def refresh_capabilities(client: aioimaplib.IMAP4) -> Coroutine[Any, Any, None]:
    """CAPABILITY, stored where aioimaplib keeps them."""
    return client.protocol.capability()


def capabilities(client: aioimaplib.IMAP4) -> set[str]:
    return set(client.protocol.capabilities)


def set_capabilities(client: aioimaplib.IMAP4, names: set[str]) -> None:
    client.protocol.capabilities = names


def mark_authenticated(client: aioimaplib.IMAP4) -> None:
    """After our own LOGIN / AUTHENTICATE: the state aioimaplib's login() would set."""
    client.protocol.state = aioimaplib.AUTH


def mark_selected(client: aioimaplib.IMAP4) -> None:
    """After our own SELECT / EXAMINE: the state aioimaplib's select() would set."""
    client.protocol.state = aioimaplib.SELECTED


def _literal(raw: bytes, binary: bool, sync: bool) -> str:
    """`{N}` / `{N+}` (RFC 7888), or their literal8 forms `~{N}` / `~{N+}` (RFC 3516)."""
    return f"{'~' if binary else ''}{{{len(raw)}{'' if sync else '+'}}}"


async def append_literal_plus(client: aioimaplib.IMAP4, mailbox: str, flags: str, date: str, raw: bytes,
                              timeout: float | None, binary: bool = False) -> Any:
    """APPEND with a non-synchronizing literal: command line and message in one write.

    What `execute` does for a sync command, except that the literal goes at once
    instead of after the server's "+".  Only when `no_command_pending(client)`.
    `binary`: a literal8, which may carry NUL bytes (only if the server announces BINARY).
    """
    proto = client.protocol
    cmd = aioimaplib.Command("APPEND", proto.new_tag(), mailbox, flags, date, _literal(raw, binary, False),
                             loop=proto.loop, timeout=timeout)
    proto.pending_sync_command = cmd
    proto.transport.write(str(cmd).encode() + b"\r\n" + raw + b"\r\n")
    try:
        await cmd.wait()
    except aioimaplib.CommandTimeout:
        proto.pending_sync_command = None
        raise
    return cmd.response


async def append_multi_literal_plus(client: aioimaplib.IMAP4, mailbox: str,
                                    messages: list[tuple[str, str, bytes]], timeout: float | None) -> Any:
    """MULTIAPPEND (RFC 3502) of (flags, date, raw) messages, every literal non-synchronizing.

    One command, one write and one tagged reply for the lot: `append_literal_plus`
    with the further messages' `flags date {N+}` parts after the first literal.
    Plain literals only (no NUL bytes); only when `no_command_pending(client)`.
    """
    proto = client.protocol
    flags, date, raw = messages[0]
    cmd = aioimaplib.Command("APPEND", proto.new_tag(), mailbox, flags, date, _literal(raw, False, False),
                             loop=proto.loop, timeout=timeout)
    out = [str(cmd).encode(), b"\r\n", raw]
    for flags, date, raw in messages[1:]:
        out += [f" {flags} {date} {_literal(raw, False, False)}\r\n".encode(), raw]
    out.append(b"\r\n")
    proto.pending_sync_command = cmd
    proto.transport.writelines(out)
    try:
        await cmd.wait()
    except aioimaplib.CommandTimeout:
        proto.pending_sync_command = None
        raise
    return cmd.response


async def append_literal8(client: aioimaplib.IMAP4, mailbox: str, flags: str, date: str, raw: bytes,
                          timeout: float | None) -> Any:
    """APPEND with a synchronizing literal8 (`~{N}`), for a server with BINARY but no LITERAL+.

    aioimaplib's own append() can only write `{N}`; its continuation handler sends
    `literal_data` when the server answers "+" to a pending APPEND, so the command is
    executed the ordinary way with our marker and our bytes.
    """
    proto = client.protocol
    cmd = aioimaplib.Command("APPEND", proto.new_tag(), mailbox, flags, date, _literal(raw, True, True),
                             loop=proto.loop, timeout=timeout)
    proto.literal_data = raw
    return await proto.execute(cmd)
