"""aiosmtpd's SMTP with a leaner command loop: the part of smtpd_adapter that reads commands.

With one new connection per message (how most MTAs deliver to an MX), aiosmtpd's
`_handle_client` loop and its command methods were most of the receiver's Python per
message (docs/performance.md, issue 17): every line is sanitised and formatted for two log
calls, every reply is written and drained on its own, and each command goes through two
awaited checks before it does anything.  `LeanSMTP` keeps aiosmtpd's loop step for step
(the same replies, limits, budgets and exceptions) with that work left out, and answers the
common form of EHLO, HELO, MAIL, RCPT, RSET, NOOP and QUIT itself.  Anything else, and any
command that is not in its plain form (a parser's case, an error, a handler hook for it),
goes to aiosmtpd's own method, which gives the answer.  tests/test_smtpd_loop.py runs the
same dialogues, errors included, through this and through stock aiosmtpd and compares every
reply.  A session with the PROXY protocol is aiosmtpd's own loop throughout.  Like the rest
of the adapter, what this uses of aiosmtpd is in smtpd_adapter.RELIES_ON.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS, BOGUS_LIMIT, SMTP, TLSSetupException

from fallback.intake.smtpsyntax import simple_path

__all__ = ["LeanSMTP"]

log = logging.getLogger(__name__)

# A client that does not read its replies gets no more of them written ahead than this.
DRAIN_AT = 64 * 1024
# MAIL parameters whose common form the fast path takes (SIZE= separately); anything else is
# aiosmtpd's to answer, so its replies to odd and wrong parameters stay word for word its own.
_MAIL_FLAGS = frozenset({"BODY=7BIT", "BODY=8BITMIME", "SMTPUTF8"})

Fast = Callable[["LeanSMTP", "str | None"], Awaitable[bool]]


class LeanSMTP(SMTP):
    """aiosmtpd's SMTP whose `_handle_client` does less per line (see the module's docstring)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # The commands answered here; a command with a handler hook of its own is aiosmtpd's,
        # and so is MAIL or RCPT without one (aiosmtpd then answers "250 OK" itself).
        # (A read-only mapping: the same for every connection, so ProtocolFactory shares it.)
        hooked = self._handle_hooks
        plain = not (self._decode_data or hasattr(self, "ehlo_hook") or hasattr(self, "rset_hook"))
        self._fast: Mapping[str, Fast] = MappingProxyType({
            name: fast for name, fast in _FAST.items()
            if plain and (name in hooked) == (name in ("MAIL", "RCPT"))})

    async def push(self, status: Any) -> None:
        # aiosmtpd drains after every reply; a drain is only needed when the client does not
        # keep up, so it is awaited only then (on loopback a drain per reply is a tenth of a
        # connection's time).
        raw = (status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(status, str)
               else status)
        self._writer.write(raw + b"\r\n")
        if self._writer.transport.get_write_buffer_size() > DRAIN_AT:
            await self._writer.drain()

    async def _handle_client(self) -> None:
        """aiosmtpd 1.4's loop, step for step, without its per-line logging."""
        if self._proxy_timeout is not None:  # the PROXY handshake first: aiosmtpd's own loop
            await super()._handle_client()
            return
        await self.push(f"220 {self.hostname} {self.__ident__}")
        budgets: dict[str, int] | None = dict(self._call_limit_base) if self._enforce_call_limit else None
        bogus = BOGUS_LIMIT
        reader, session = self._reader, self.session
        assert session is not None
        # Not one command more once the connection is closing (QUIT, a 421, a timeout): a reply
        # is no longer drained, which is where aiosmtpd's loop stopped, and pipelined commands
        # still buffered must not reach the handler (a message stored after "goodbye" would be
        # stored again when the client retries).
        while self.transport is not None and not self.transport.is_closing():
            try:
                try:
                    line = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    await self._skip_long_line(error.consumed)
                    continue
                line = line.rstrip(b"\r\n")
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                arg = None
                if arg_bytes:
                    arg = self._argument(arg_bytes)
                    if arg is None:
                        await self.push("500 Error: strict ASCII mode")
                        continue
                limit = (self.command_size_limits[command] if session.extended_smtp
                         else self.command_size_limit)
                if len(line) > limit:
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if (self.require_starttls and not self._tls_protocol
                        and command not in ALLOWED_BEFORE_STARTTLS):
                    await self.push("530 Must issue a STARTTLS command first")
                    continue
                if budgets is not None:
                    budget = budgets.get(command, self._call_limit_default)
                    if budget < 1:
                        log.warning("%r over limit for %s", session.peer, command)
                        await self.push(f"421 4.7.0 {command} sent too many times")
                        self.transport.close()
                        continue
                    budgets[command] = budget - 1
                method = self._smtp_methods.get(command)
                if method is None:
                    log.warning("%r unrecognised: %s", session.peer, command)
                    bogus -= 1
                    if bogus < 1:
                        log.warning("%r too many bogus commands", session.peer)
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()
                if command == "QUIT" and not arg and "QUIT" not in self._handle_hooks:
                    await self.push("221 Bye")
                    self.transport.close()
                    return
                fast = self._fast.get(command)
                if fast is None or not await fast(self, arg):
                    await method(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:
                await self._answer_exception(error)

    def _argument(self, arg_bytes: bytes) -> str | None:
        """The argument as aiosmtpd decodes it: UTF-8 with the raw bytes kept (surrogateescape)
        under SMTPUTF8, else strict ASCII (None when it is not)."""
        arg_bytes = arg_bytes.strip()
        if self.enable_SMTPUTF8:
            return str(arg_bytes, encoding="utf-8", errors="surrogateescape")
        try:
            return str(arg_bytes, encoding="ascii", errors="strict")
        except UnicodeDecodeError:
            return None

    async def _skip_long_line(self, consumed: int) -> None:
        """A line over the stream's limit: read to its end, then 500 (as aiosmtpd does)."""
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil()
                break
            except asyncio.LimitOverrunError as e:
                await self._reader.read(e.consumed)
        await self.push("500 Command line too long")

    async def _answer_exception(self, error: Exception) -> None:
        status = None
        try:
            status = await self.handle_exception(error)
        except Exception as inner:
            try:
                log.exception("%r Exception in handle_exception()", getattr(self.session, "peer", None))
                status = f"500 Error: ({inner.__class__.__name__}) {inner}"
            except Exception:
                status = "500 Error: Cannot describe error"
        finally:
            if isinstance(error, TLSSetupException):
                if self.transport is not None:
                    self.transport.close()
                self.connection_lost(error)
            else:
                await self.push(status)

    # --- the common commands in their plain form: True when answered here -------------

    async def _fast_ehlo(self, hostname: str | None) -> bool:
        if not hostname or self._ehlo_hook_ver is not None:
            return False
        lines = ["250-" + self.hostname]
        self._set_rset_state()
        session = self.session
        assert session is not None
        session.extended_smtp = True
        if self.data_size_limit:
            lines.append(f"250-SIZE {self.data_size_limit}")
            self.command_size_limits["MAIL"] += 26
        lines.append("250-8BITMIME")  # decode_data is off, or there is no fast path
        if self.enable_SMTPUTF8:
            lines.append("250-SMTPUTF8")
            self.command_size_limits["MAIL"] += 10
        if self.tls_context and not self._tls_protocol:
            lines.append("250-STARTTLS")
        if not self._auth_require_tls or self._tls_protocol:
            lines.append("250-AUTH " + " ".join(sorted(self._auth_methods.keys())))
        session.host_name = hostname
        lines.append("250 HELP")
        # aiosmtpd writes and drains each line on its own: one write does for all of them.
        await self.push("\r\n".join(lines))
        return True

    async def _fast_helo(self, hostname: str | None) -> bool:
        if not hostname:
            return False
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self.hostname}")
        return True

    async def _fast_noop(self, arg: str | None) -> bool:
        await self.push("250 OK")
        return True

    async def _fast_rset(self, arg: str | None) -> bool:
        if arg:
            return False
        self._set_rset_state()
        await self.push("250 OK")
        return True

    def _ready_for(self, keyword: str, arg: str | None) -> tuple[str, str] | None:
        """The address and the rest of MAIL FROM:/RCPT TO:<local@domain> when the session is
        where aiosmtpd's checks would let it through, else None (aiosmtpd answers)."""
        session = self.session
        assert session is not None
        if (not session.host_name or (self._auth_required and not session.authenticated)
                or arg is None or arg[:len(keyword)].upper() != keyword):
            return None
        found = simple_path(arg[len(keyword):].strip(), self.local_part_limit)
        if found is None or (found[1] and not session.extended_smtp):
            return None
        return found

    async def _fast_mail(self, arg: str | None) -> bool:
        found = self._ready_for("FROM:", arg)
        envelope = self.envelope
        assert envelope is not None
        if found is None or envelope.mail_from:
            return False
        address, rest = found
        options = rest.upper().split()
        names = set()
        for option in options:
            name, _, value = option.partition("=")
            if name in names:
                return False
            names.add(name)
            if option in _MAIL_FLAGS:
                continue
            if name != "SIZE" or not (value.isascii() and value.isdigit()):
                return False
            if self.data_size_limit and int(value) > self.data_size_limit:
                return False
        if "SMTPUTF8" in names and not self.enable_SMTPUTF8:
            return False
        envelope.smtp_utf8 = "SMTPUTF8" in names
        await self.push(await self._call_handler_hook("MAIL", address, options))
        return True

    async def _fast_rcpt(self, arg: str | None) -> bool:
        found = self._ready_for("TO:", arg)
        assert self.envelope is not None
        if found is None or found[1] or not self.envelope.mail_from:
            return False
        await self.push(await self._call_handler_hook("RCPT", found[0], []))
        return True


_FAST: dict[str, Fast] = {
    "EHLO": LeanSMTP._fast_ehlo, "HELO": LeanSMTP._fast_helo, "NOOP": LeanSMTP._fast_noop,
    "RSET": LeanSMTP._fast_rset, "MAIL": LeanSMTP._fast_mail, "RCPT": LeanSMTP._fast_rcpt,
}
