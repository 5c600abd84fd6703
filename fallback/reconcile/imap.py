"""One IMAP session with the main store, as the reconciler needs it (aioimaplib underneath).

It owns the wire details: the master-user login (`user*master`, or SASL
PLAIN with an authorization id), quoting, modified UTF-7 mailbox names,
SPECIAL-USE discovery, APPEND with flags and INTERNALDATE (reading APPENDUID;
many messages in one MULTIAPPEND where offered; a literal8 for a message
with NUL bytes where the server speaks BINARY), UID SEARCH / FETCH / STORE /
MOVE, and what IMAP lets a client see of the bytes a server stored
(`byte_changes`).  Two kinds of failure are kept apart because exactly-once
depends on it: `ServerRefused` means the server answered NO/BAD
(the command certainly did nothing), `ConnectionLost` means the outcome is
unknown (an APPEND may or may not have been stored).  It uses aioimaplib's
public client only; what reaches under it is in imap_adapter.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import inspect
import re
import ssl
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aioimaplib

from fallback.errors import ConfigError, ReconcileError
from fallback.reconcile import imap_adapter as adapter

T = TypeVar("T")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.I)
_APPENDUID_SET = re.compile(rb"\[APPENDUID (\d+) ([\d:,]+)\]", re.I)
_COPYUID = re.compile(rb"\[COPYUID \d+ [\d:,]+ (\d+)\]", re.I)
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.I)
_LIST_LINE = re.compile(rb'^\((?P<attrs>[^)]*)\) (?P<delim>NIL|"(?:[^"\\]|\\.)*") (?P<name>.+)$')
_FLAG = re.compile(r"^\\?[A-Za-z0-9$_.\-]+$")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ServerRefused(ReconcileError):
    """The server answered NO or BAD: nothing was done; `reason` holds its words."""


class ConnectionLost(ReconcileError):
    """The connection broke or timed out: whatever was in flight may or may not have happened."""


@dataclass(frozen=True)
class ImapTarget:
    host: str
    port: int
    tls: bool
    timeout: float = 120.0
    ca_file: Path | None = None

    @classmethod
    def from_url(cls, url: str, timeout: float = 120.0, ca_file: Path | None = None) -> ImapTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("imap", "imaps") or not parts.hostname:
            raise ConfigError(f"imap_url: {url!r} must look like imap://HOST:PORT or imaps://HOST:PORT")
        tls = parts.scheme == "imaps"
        try:
            port = parts.port or (993 if tls else 143)
        except ValueError:
            raise ConfigError(f"imap_url: {url!r} has a bad port") from None
        return cls(parts.hostname, port, tls, timeout, ca_file)

    def __str__(self) -> str:
        return f"{'imaps' if self.tls else 'imap'}://{self.host}:{self.port}"


def quote(text: str) -> str:
    """An IMAP quoted string (RFC 3501 section 9); CR, LF and NUL cannot be quoted."""
    if re.search(r"[\x00\r\n]", text):
        raise ValueError(f"cannot quote {text!r} in IMAP")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_mailbox(name: str) -> str:
    """Unicode mailbox name -> modified UTF-7 (RFC 3501 section 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_mailbox(name: str) -> str:
    """Modified UTF-7 -> Unicode, for display."""
    def repl(m: re.Match[str]) -> str:
        body = m.group(1)
        if not body:
            return "&"
        data = body.replace(",", "/")
        data += "=" * (-len(data) % 4)
        return base64.b64decode(data).decode("utf-16-be")

    return re.sub(r"&([A-Za-z0-9+,]*)-", repl, name)


def imap_flags(flags: Iterable[str]) -> list[str]:
    """Only well-formed flag atoms reach the wire; \\Recent can never be set by a client."""
    return [f for f in flags if _FLAG.match(f) and f.lower() != "\\recent"]


def uid_set(text: str) -> list[int]:
    """An RFC 4315 uid-set ("7:9,12") as its UIDs in order; a range may run downwards."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        a, b = int(lo), int(hi or lo)
        out += range(a, b + 1) if a <= b else range(a, b - 1, -1)
    return out


def search_date(ts_ms: int) -> str:
    """SINCE criterion two days before `ts_ms`: servers compare dates in their own time zone."""
    day = dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC) - dt.timedelta(days=2)
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


def _unquote(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if text.startswith('"') and text.endswith('"'):
        text = re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _text(response: Any) -> str:
    """The server's words from the tagged reply (the last line of an aioimaplib Response)."""
    lines = [ln for ln in response.lines if isinstance(ln, bytes | bytearray)]
    text = bytes(lines[-1]).decode("utf-8", "replace") if lines else ""
    # Dovecot appends its timing, "(0.001 + 0.000 secs).": noise in a report.
    text = re.sub(r"\s*\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)\.?$", "", text)
    return text.strip() or "no reason given"


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where `a` and `b` differ (they do), compared a block at a time."""
    step = 65536
    start = 0
    while a[start:start + step] == b[start:start + step]:
        start += step
    return next(i for i in range(start, start + step) if a[i:i + 1] != b[i:i + 1])


def byte_changes(sent: bytes, stored: bytes, binary: bool) -> str | None:
    """Why `stored` (the server's FETCH BODY[] of what we APPENDed) differs from `sent`; None if not.

    BODY[] cannot carry NUL even from a server that took the message as binary
    (RFC 3516 section 4.3), so after a BINARY APPEND the server's stand-in byte at a NUL
    counts as the NUL.  Without BINARY nothing can: a NUL given back as another byte is
    what every IMAP client of that server sees, and is reported.
    """
    if stored == sent:
        return None
    if len(stored) != len(sent):
        return (f"the main store gives back {len(stored)} bytes for the {len(sent)} sent "
                "(it re-encoded or altered the message)")
    nuls = [m.start() for m in re.finditer(b"\0", sent)]
    masked = bytearray(stored)
    for i in nuls:
        masked[i] = 0
    if masked == sent:
        if binary:
            return None
        return (f"{len(nuls)} NUL byte(s) come back as other bytes: the main store does not announce "
                "BINARY (RFC 3516), and a plain IMAP literal cannot carry NUL")
    at = _first_difference(sent, bytes(masked))
    return f"the main store changed the message's bytes (first difference at byte {at})"


@dataclass(frozen=True)
class Folder:
    name: str          # on the wire (modified UTF-7)
    attributes: frozenset[str]


class Session:
    """One logged-in connection as one user.  Use `async with await Session.open(...)`."""

    def __init__(self, target: ImapTarget, client: aioimaplib.IMAP4, lost: asyncio.Event) -> None:
        self.target = target
        self.client = client
        self._lost = lost
        self.selected: str | None = None
        self.uidvalidity: int | None = None
        self.readonly = False

    @classmethod
    async def open(cls, target: ImapTarget, user: str, master: str, password: str,
                   separator: str = "*") -> Session:
        lost = asyncio.Event()
        holder: list[aioimaplib.IMAP4] = []

        def on_lost(_exc: Exception | None) -> None:
            # aioimaplib leaves commands waiting (until their timeout) when the socket dies:
            # fail them now, so an APPEND in flight ends at once as "outcome unknown".
            lost.set()
            if holder:
                adapter.fail_pending(holder[0], lambda: ConnectionLost("connection closed"))

        ctx: ssl.SSLContext | None = None
        if target.tls:
            ctx = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
        client = (aioimaplib.IMAP4_SSL(target.host, target.port, timeout=target.timeout, ssl_context=ctx)
                  if target.tls else
                  aioimaplib.IMAP4(target.host, target.port, timeout=target.timeout, conn_lost_cb=on_lost))
        holder.append(client)
        if target.tls:
            adapter.set_lost_callback(client, on_lost)
        session = cls(target, client, lost)
        try:
            await session._call(client.wait_hello_from_server(), "connect")
        except ConnectionLost as exc:
            raise ConnectionLost(f"cannot connect to {target}: {exc.reason}") from None
        await session._login(user, master, password, separator)
        return session

    async def _login(self, user: str, master: str, password: str, separator: str) -> None:
        # Our own LOGIN: aioimaplib's login() would quote the password but not the user.
        if separator:
            who = f"{user}{separator}{master}"
            cmd = adapter.command(self.client, "LOGIN", quote(who), quote(password))
        else:
            # SASL PLAIN: authorization id = the user, authentication id = the master.
            who = f"{master} as {user}"
            blob = base64.b64encode(f"{user}\0{master}\0{password}".encode()).decode()
            cmd = adapter.command(self.client, "AUTHENTICATE", "PLAIN", blob)
        response = await self._call(adapter.execute(self.client, cmd, scrub=password), "login")
        if response.result != "OK":
            raise ServerRefused(f"login as {who} refused by {self.target}: {_text(response)}")
        adapter.mark_authenticated(self.client)
        # Dovecot (and most servers) list the capabilities in the LOGIN reply: no round trip.
        m = re.search(rb"\[CAPABILITY ([^\]]+)\]", b" ".join(bytes(x) for x in response.lines))
        if m:
            adapter.set_capabilities(self.client, set(m.group(1).decode("ascii", "replace").split()))
        else:
            await self._call(adapter.refresh_capabilities(self.client), "CAPABILITY")

    async def _call(self, aw: Awaitable[T], what: str, timed: bool = True) -> T:
        """Run one command; a dead or silent connection becomes ConnectionLost.

        `timed=False` for commands that carry aioimaplib's own timer (APPEND): the hot
        path then costs no extra task.
        """
        if self._lost.is_set():
            if inspect.iscoroutine(aw):
                aw.close()
            raise ConnectionLost(f"{what}: connection closed ({self.target})")
        try:
            if timed:
                return await asyncio.wait_for(aw, self.target.timeout)
            return await aw
        except ConnectionLost:
            raise ConnectionLost(f"{what}: connection closed ({self.target})") from None
        except (TimeoutError, aioimaplib.CommandTimeout):
            raise ConnectionLost(f"{what}: timed out ({self.target})") from None
        except (aioimaplib.Abort, aioimaplib.Error, OSError) as exc:
            raise ConnectionLost(f"{what}: {exc} ({self.target})") from None

    def has(self, capability: str) -> bool:
        return capability.upper() in {c.upper() for c in adapter.capabilities(self.client)}

    async def folders(self) -> list[Folder]:
        pattern = '"*" RETURN (SPECIAL-USE)' if self.has("SPECIAL-USE") else '"*"'
        response = await self._call(self.client.list('""', pattern), "LIST")
        if response.result != "OK":
            raise ServerRefused(f"LIST refused: {_text(response)}")
        out = []
        for line in response.lines[:-1]:
            m = _LIST_LINE.match(bytes(line))
            if m:
                attrs = frozenset(a.lower() for a in m.group("attrs").decode().split())
                out.append(Folder(_unquote(m.group("name")), attrs))
        return out

    async def create(self, name: str) -> None:
        response = await self._call(self.client.create(quote(name)), "CREATE")
        if response.result != "OK" and "ALREADYEXISTS" not in _text(response).upper():
            raise ServerRefused(f"CREATE {decode_mailbox(name)!r} refused: {_text(response)}")

    async def select(self, name: str, readonly: bool = False) -> int:
        """SELECT (or EXAMINE) a mailbox; returns its UIDVALIDITY."""
        if self.selected == name and self.readonly == readonly and self.uidvalidity is not None:
            return self.uidvalidity
        verb = "EXAMINE" if readonly else "SELECT"
        # Our own command: aioimaplib's examine() would not change the state to SELECTED.
        cmd = adapter.command(self.client, verb, quote(name))
        response = await self._call(adapter.execute(self.client, cmd), verb)
        if response.result != "OK":
            self.selected = None
            raise ServerRefused(f"{verb} {decode_mailbox(name)!r} refused: {_text(response)}")
        adapter.mark_selected(self.client)
        validity = None
        for line in response.lines:
            m = _UIDVALIDITY.search(bytes(line))
            if m:
                validity = int(m.group(1))
        if validity is None:
            raise ServerRefused(f"{verb} {decode_mailbox(name)!r}: the server sent no UIDVALIDITY")
        self.selected, self.uidvalidity, self.readonly = name, validity, readonly
        return validity

    def wants_binary(self, raw: bytes) -> bool:
        """NUL bytes go in a literal8 (RFC 3516) where the server announces BINARY.

        A plain literal may not carry NUL (RFC 3501 section 4.3); every other message
        keeps the plain literal, which servers store byte for byte.
        """
        return b"\0" in raw and self.has("BINARY")

    async def append(self, folder: str, raw: bytes, flags: list[str],
                     ts_ms: int) -> tuple[int | None, int | None]:
        """APPEND; returns (UIDVALIDITY, UID) from APPENDUID, or (None, None) without UIDPLUS."""
        when = dt.datetime.fromtimestamp(ts_ms // 1000, dt.UTC)
        flag_text = "(" + " ".join(imap_flags(flags)) + ")"
        binary = self.wants_binary(raw)
        if self.has("LITERAL+") and adapter.no_command_pending(self.client):
            # Saves the wait for the server's "+" on every message (RFC 7888).
            aw = adapter.append_literal_plus(self.client, quote(folder), flag_text,
                                             aioimaplib.time2internaldate(when), raw, self.target.timeout,
                                             binary=binary)
        elif binary:
            aw = adapter.append_literal8(self.client, quote(folder), flag_text,
                                         aioimaplib.time2internaldate(when), raw, self.target.timeout)
        else:
            aw = self.client.append(raw, quote(folder), flag_text, when)
        response = await self._call(aw, "APPEND", timed=False)
        if response.result != "OK":
            raise ServerRefused(_text(response))
        for line in response.lines:
            m = _APPENDUID.search(bytes(line))
            if m:
                return int(m.group(1)), int(m.group(2))
        return None, None

    def can_multiappend(self) -> bool:
        """Several messages per APPEND (RFC 3502), sent in one write: needs LITERAL+ as well."""
        return self.has("MULTIAPPEND") and self.has("LITERAL+")

    async def append_many(self, folder: str, messages: list[tuple[bytes, list[str], int]]
                          ) -> tuple[int | None, list[int] | None]:
        """MULTIAPPEND of (raw, flags, ts_ms) without NUL bytes: all stored or none (RFC 3502).

        Returns UIDVALIDITY and the UIDs in the messages' order from APPENDUID, or
        (None, None) without UIDPLUS.  ServerRefused: none was stored.
        """
        if not adapter.no_command_pending(self.client):
            raise ConnectionLost("APPEND: another command is in flight")
        parts = [("(" + " ".join(imap_flags(flags)) + ")",
                  aioimaplib.time2internaldate(dt.datetime.fromtimestamp(ts // 1000, dt.UTC)), raw)
                 for raw, flags, ts in messages]
        aw = adapter.append_multi_literal_plus(self.client, quote(folder), parts, self.target.timeout)
        response = await self._call(aw, "APPEND", timed=False)
        if response.result != "OK":
            raise ServerRefused(_text(response))
        for line in response.lines:
            m = _APPENDUID_SET.search(bytes(line))
            if m:
                uids = uid_set(m.group(2).decode())
                return int(m.group(1)), (uids if len(uids) == len(messages) else None)
        return None, None

    async def find(self, folder: str, msg_id: str, ts_ms: int) -> list[int]:
        """UIDs in `folder` whose Received: header carries our unique id (never sender data)."""
        await self.select(folder, readonly=self.readonly)
        criteria = ("SINCE", search_date(ts_ms), "HEADER", "Received", quote(msg_id))
        response = await self._call(self.client.uid_search(*criteria, charset=None), "UID SEARCH")
        if response.result != "OK":
            raise ServerRefused(f"UID SEARCH refused: {_text(response)}")
        uids: list[int] = []
        # aioimaplib hands over the untagged "* SEARCH 3 7" lines without their "SEARCH".
        for line in response.lines[:-1]:
            uids += [int(u) for u in bytes(line).decode("ascii", "replace").split() if u.isdigit()]
        return uids

    async def fetch_message(self, folder: str, uid: int) -> bytes:
        """The message as the server gives it back (UID FETCH BODY.PEEK[]: \\Seen stays as it is)."""
        await self.select(folder, readonly=self.readonly)
        response = await self._call(self.client.uid("FETCH", str(uid), "(BODY.PEEK[])"), "UID FETCH")
        if response.result != "OK":
            raise ServerRefused(f"UID FETCH refused: {_text(response)}")
        # aioimaplib hands over the literal as the one bytearray among the reply's lines.
        for line in response.lines:
            if isinstance(line, bytearray):
                return bytes(line)
        raise ServerRefused(f"UID FETCH {uid} in {decode_mailbox(folder)!r}: the server sent no message")

    async def store_flags(self, uid: int, add: list[str], remove: list[str]) -> None:
        for op, flags in (("+FLAGS.SILENT", imap_flags(add)), ("-FLAGS.SILENT", imap_flags(remove))):
            if not flags:
                continue
            response = await self._call(
                self.client.uid("STORE", str(uid), op, "(" + " ".join(flags) + ")"), "UID STORE")
            if response.result != "OK":
                raise ServerRefused(f"UID STORE refused: {_text(response)}")

    async def move(self, uid: int, dest: str) -> int | None:
        """Move one message of the selected folder; returns its new UID when the server says (COPYUID)."""
        if self.has("MOVE"):
            response = await self._call(self.client.uid("MOVE", str(uid), quote(dest)), "UID MOVE")
        else:
            response = await self._call(self.client.uid("COPY", str(uid), quote(dest)), "UID COPY")
            if response.result == "OK":
                await self.store_flags(uid, ["\\Deleted"], [])
                if self.has("UIDPLUS"):
                    # Our own command: aioimaplib's uid("EXPUNGE") matches UIDPLUS case-sensitively.
                    expunge = adapter.command(self.client, "EXPUNGE", str(uid), prefix="UID")
                    await self._call(adapter.execute(self.client, expunge), "UID EXPUNGE")
        if response.result != "OK":
            raise ServerRefused(f"moving to {decode_mailbox(dest)!r} refused: {_text(response)}")
        for line in response.lines:
            m = _COPYUID.search(bytes(line))
            if m:
                return int(m.group(1))
        return None

    async def close(self) -> None:
        """LOGOUT without waiting for the goodbye: nothing we need comes back."""
        if not self._lost.is_set():
            with contextlib.suppress(Exception):
                adapter.write_raw(self.client, f"{adapter.new_tag(self.client)} LOGOUT\r\n".encode())
        adapter.drop_connection(self.client)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
