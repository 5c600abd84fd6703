"""One IMAP probe of one mailstore: connect, master login as the probe user, SELECT INBOX, NOOP,
LOGOUT, each step timed.

A probe is what a user's mail client would do first, through the same
master user reconcile uses, so a mailstore that accepts TCP but cannot open a
mailbox (a broken index, a stuck storage backend) fails it.  It fails on any
error, on a step that does not answer in time, and on a total slower than
`slow_after`: a mailstore rebuilding its indexes is slow before it is dead.

The five commands are spoken on a plain asyncio stream rather than through
aioimaplib: a probe must own its socket, to close it the moment a step
times out (a paused Dovecot), and aioimaplib's public client cannot be
closed without reaching into its internals, which only the reconcile
adapter may do.  No reply needs more than reading lines up to the tagged
one.  The master login `user*master` is sent as a quoted string because `*`
may not stand in an IMAP atom.

Failures are sorted into kinds, because the watcher treats them apart:
`dns` (the name does not resolve) and `auth` (the login is refused) may be
the watcher's own configuration rather than the mailstore; everything else
(`refused`, `timeout`, `slow`, `error`) is the mailstore.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from fallback.errors import InputError
from fallback.mailbox.directory import check_mailstore

STEPS = ("connect", "login", "select", "noop", "logout")
OK, SLOW, TIMEOUT, AUTH, DNS, REFUSED, ERROR = "ok", "slow", "timeout", "auth", "dns", "refused", "error"
CONFIG_KINDS = (AUTH, DNS)  # may be the watcher's mistake, not the mailstore's

MAX_LINE = 64 * 1024  # a probe reads greetings and status lines, nothing big
TARGET_FORM = "NAME=imap://HOST:PORT/PROBE_USER (or imaps://)"


@dataclass(frozen=True)
class Target:
    """One mailstore to watch: its name (as provisioning knows it) and how to reach its IMAP."""

    name: str
    scheme: str
    host: str
    port: int
    user: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{self.user}"


def parse_target(spec: str) -> Target:
    """`NAME=imap://HOST:PORT/PROBE_USER`; a bad one is an InputError naming what is wrong."""
    name, sep, url = spec.partition("=")
    if not sep or not name.strip():
        raise InputError(f"target {spec!r}: expected {TARGET_FORM}")
    return target_from_url(name.strip(), url.strip())


def target_from_url(name: str, url: str) -> Target:
    try:
        check_mailstore(name)
    except InputError as exc:
        raise InputError(f"target {name!r}: {exc.reason}") from None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"target {name}: bad URL {url!r} ({exc}); expected {TARGET_FORM}") from None
    if parts.scheme not in ("imap", "imaps"):
        raise InputError(f"target {name}: bad URL {url!r}: the scheme must be imap:// or imaps://")
    if not parts.hostname:
        raise InputError(f"target {name}: bad URL {url!r}: no host; expected {TARGET_FORM}")
    user = unquote(parts.path.lstrip("/"))
    if not user or "/" in user or any(c in user for c in '"\\\r\n'):
        raise InputError(f"target {name}: bad URL {url!r}: give the probe user as the path "
                         f"({TARGET_FORM})")
    return Target(name, parts.scheme, parts.hostname, port or (993 if parts.scheme == "imaps" else 143),
                  user)


@dataclass(frozen=True)
class Result:
    """How one probe went: `kind` is OK or why it failed; `steps` the seconds of each step done."""

    target: str
    kind: str
    reason: str = ""
    steps: dict[str, float] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.kind == OK

    @property
    def total(self) -> float:
        return sum(self.steps.values())

    def describe(self) -> str:
        timings = " ".join(f"{s}={v:.3f}s" for s, v in self.steps.items())
        text = "ok" if self.ok else f"{self.kind}: {self.reason}"
        return f"{self.target} {text} ({timings or 'no step done'})"


class _Failed(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class _Session:
    """The five commands on an asyncio stream; tagged replies, untagged lines skipped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.tag = reader, writer, 0

    async def greeting(self) -> None:
        line = await self._line()
        if not line.startswith(b"* OK"):
            raise _Failed(ERROR, f"greeting: {_show(line)}")

    async def command(self, step: str, text: str, kind: str = ERROR) -> None:
        self.tag += 1
        tag = f"p{self.tag}".encode()
        self.writer.write(tag + b" " + text.encode() + b"\r\n")
        await self.writer.drain()
        while True:
            line = await self._line()
            if line.startswith(tag + b" "):
                status = line[len(tag) + 1:]
                if not status.startswith(b"OK"):
                    raise _Failed(kind, f"{step} answered {_show(status)}")
                return

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise _Failed(ERROR, "the server closed the connection")
        if len(line) > MAX_LINE:
            raise _Failed(ERROR, "reply line too long")
        return line.rstrip(b"\r\n")

    def close(self) -> None:
        self.writer.close()


def _show(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")[:200]


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def probe(target: Target, master_user: str, master_password: str, *, slow_after: float,
                timeout: float | None = None, ssl_context: ssl.SSLContext | None = None) -> Result:
    """Probe `target` once.  Each step may take up to `timeout` (default slow_after: one step that
    slow already makes the probe slow)."""
    limit = slow_after if timeout is None else timeout
    steps: dict[str, float] = {}
    session: _Session | None = None

    async def timed(step: str, work: Awaitable[Any]) -> Any:
        started = time.monotonic()
        try:
            return await asyncio.wait_for(work, limit)
        except TimeoutError:
            raise _Failed(TIMEOUT, f"{step} did not answer within {limit:g}s") from None
        finally:
            steps[step] = steps.get(step, 0.0) + time.monotonic() - started

    try:
        try:
            await timed("connect", _resolve(target))
            tls = None
            if target.scheme == "imaps":
                tls = ssl_context or ssl.create_default_context()
            reader, writer = await timed("connect", asyncio.open_connection(
                target.host, target.port, ssl=tls, limit=MAX_LINE * 2))
            session = _Session(reader, writer)
            await timed("connect", session.greeting())
            login = f"LOGIN {_quoted(target.user + '*' + master_user)} {_quoted(master_password)}"
            await timed("login", session.command("login", login, AUTH))
            await timed("select", session.command("select", "SELECT INBOX"))
            await timed("noop", session.command("noop", "NOOP"))
            await timed("logout", session.command("logout", "LOGOUT"))
        except ConnectionRefusedError as exc:
            raise _Failed(REFUSED, f"connection refused ({exc.strerror or exc})") from None
        except (OSError, ValueError) as exc:  # ValueError: StreamReader's line limit
            raise _Failed(ERROR, f"{type(exc).__name__}: {exc}") from None
    except _Failed as failed:
        return Result(target.name, failed.kind, failed.reason, steps)
    finally:
        if session is not None:
            session.close()
    total = sum(steps.values())
    if total > slow_after:
        return Result(target.name, SLOW, f"took {total:.3f}s, over slow-after {slow_after:g}s", steps)
    return Result(target.name, OK, "", steps)


async def _resolve(target: Target) -> None:
    """Resolution apart from connecting: a name that does not resolve is a configuration mistake."""
    try:
        await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _Failed(DNS, f"host {target.host} does not resolve ({exc.strerror or exc})") from None
