"""The one place that touches aiosmtpd's internals: our SMTP protocol subclass.

aiosmtpd gives the receiver its SMTP state machine; the handler
(receiver.Receiver) sees only aiosmtpd's documented hooks (handle_MAIL,
handle_RCPT, handle_DATA, handle_exception) and the Session/Envelope they
are given.  What needs more than that lives here, and `RELIES_ON` names all
of it, so that an aiosmtpd upgrade fails in tests/test_smtpd_adapter.py
rather than in production:

* the connection caps and the whole-connection deadline (connection_made,
  connection_lost, transport, loop);
* the short path for `<local@domain>` in MAIL/RCPT (_getaddr, local_part_limit);
* DATA read in large pieces (smtpsyntax.read_data) instead of line by line:
  smtp_DATA replaced, with the pieces of the original it needs (_reader,
  _writer, check_helo_needed, check_auth_needed, _call_handler_hook,
  _set_post_data_state, data_size_limit, event_handler);
* our envelope (_create_envelope), which carries the message id and each
  recipient's mailstore from RCPT to DATA;
* aiosmtpd's own reply for a declared SIZE over the limit, rewritten into our
  enhanced code (push, SIZE_REPLY).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from fallback.errors import MessageTooBig, TooManyConnections
from fallback.intake.smtpsyntax import read_data, simple_path

__all__ = ["RELIES_ON", "SIZE_REPLY", "ConnectionTracker", "FallbackEnvelope", "FallbackSMTP", "Session"]

log = logging.getLogger(__name__)

# What this module uses from aiosmtpd 1.4, checked by tests/test_smtpd_adapter.py:
# "SMTP.x" is on the class, "SMTP().x" on a connected instance, "SMTP(x=)" a constructor
# keyword, "Envelope().x" / "Session().x" on a fresh instance (the handler reads those).
RELIES_ON: tuple[str, ...] = (
    "aiosmtpd.smtp.SMTP", "aiosmtpd.smtp.Envelope", "aiosmtpd.smtp.Session", "aiosmtpd.smtp.syntax",
    "SMTP(data_size_limit=)", "SMTP(hostname=)", "SMTP(ident=)", "SMTP(tls_context=)",
    "SMTP(timeout=)", "SMTP(command_call_limit=)", "SMTP(enable_SMTPUTF8=)",
    "SMTP.line_length_limit", "SMTP.local_part_limit",
    "SMTP._getaddr", "SMTP._create_envelope", "SMTP._call_handler_hook", "SMTP._set_post_data_state",
    "SMTP.check_helo_needed", "SMTP.check_auth_needed", "SMTP.push", "SMTP.smtp_DATA",
    "SMTP.connection_made", "SMTP.connection_lost",
    "SMTP()._reader", "SMTP()._writer", "SMTP().transport", "SMTP().loop", "SMTP().event_handler",
    "SMTP().data_size_limit", "SMTP().envelope", "SMTP().session",
    "Envelope().mail_from", "Envelope().mail_options", "Envelope().rcpt_tos", "Envelope().content",
    "Envelope().original_content",
    "Session().peer", "Session().ssl", "Session().host_name", "Session().extended_smtp",
)

# aiosmtpd's own reply to MAIL FROM with SIZE= over data_size_limit (it refuses that before
# our handler sees the transaction); the test checks aiosmtpd still answers exactly this.
SIZE_REPLY = "552 Error: message size exceeds fixed maximum message size"
_REPLY_REWRITES = {
    SIZE_REPLY.encode(): MessageTooBig("declared SIZE over the limit").smtp_reply().encode(),
}


class ConnectionTracker:
    """Counts live connections, in total and per client IP, for the 421 caps and shutdown."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.by_ip: Counter[str] = Counter()
        self.connections: set[FallbackSMTP] = set()
        self.shutting_down = False

    def admit(self, conn: FallbackSMTP, ip: str) -> bool:
        if self.shutting_down or len(self.connections) >= self.total or self.by_ip[ip] >= self.per_ip:
            return False
        self.connections.add(conn)
        self.by_ip[ip] += 1
        return True

    def release(self, conn: FallbackSMTP, ip: str) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.by_ip[ip] -= 1
            if self.by_ip[ip] <= 0:
                del self.by_ip[ip]


class FallbackEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        # Every accepted recipient -> its mailstore, in RCPT order (what routing.decide reads).
        self.mailstores: dict[str, str] = {}
        # Given at MAIL FROM, so the mail log ties rejections and the stored message together.
        self.msg_id = ""


# Told about a message aiosmtpd (or our DATA reader) refused for its size: (connection, reply).
LimitLog = Callable[["FallbackSMTP", str], None]


class FallbackSMTP(SMTP):
    # aiosmtpd's stream buffer limit: the longest command line, and the largest piece
    # DATA is read in.  DATA lines themselves may be longer than RFC 5322's 998 octets
    # (HTML from bad generators): refusing them would bounce real mail.
    line_length_limit = 1024 * 1024

    def __init__(self, handler: Any, tracker: ConnectionTracker, *, on_limit: LimitLog,
                 connection_timeout: float, idle_timeout: float, max_message_size: int | None,
                 max_commands: int | None, hostname: str, tls: ssl.SSLContext | None) -> None:
        super().__init__(handler, data_size_limit=max_message_size, hostname=hostname,
                         ident="fallback ESMTP", tls_context=tls, timeout=idle_timeout,
                         command_call_limit=max_commands, enable_SMTPUTF8=True)
        self.tracker = tracker
        self.on_limit = on_limit
        self.connection_timeout = connection_timeout
        self.peer_ip = ""
        self.admitted = False
        self.storing = False
        self._deadline: asyncio.TimerHandle | None = None

    def _create_envelope(self) -> FallbackEnvelope:
        return FallbackEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and not self.admitted:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if peer else "unknown"
            if not self.tracker.admit(self, self.peer_ip):
                reply = TooManyConnections("connection cap").smtp_reply()
                transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                log.info("refused connection from %s: %s", self.peer_ip, reply)
                return
            self.admitted = True
            self._deadline = self.loop.call_later(self.connection_timeout, self._time_is_up)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self.admitted:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self.tracker.release(self, self.peer_ip)
        super().connection_lost(error)

    def _time_is_up(self) -> None:
        self.close_with(b"421 4.4.2 Connection time limit exceeded, closing")

    def close_with(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply + b"\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    @property
    def busy(self) -> bool:
        """Inside a transaction: shutdown waits for it instead of cutting it."""
        return self.storing or (self.envelope is not None and self.envelope.mail_from is not None)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's parser costs about a tenth of the receiver's CPU per message;
        # the plain `<local@domain>` that nearly every client sends needs none of it.
        found = simple_path(arg, self.local_part_limit)
        return found if found is not None else super()._getaddr(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, with the message read in large pieces (smtpsyntax.read_data)
        instead of line by line, and our own reply when it is over the size limit."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await read_data(self._reader, self.data_size_limit)
        except asyncio.CancelledError:
            log.info("connection from %s lost during DATA", self.peer_ip)
            self._writer.close()
            raise
        if content is None:
            reply = MessageTooBig("DATA over the limit").smtp_reply()
            self.on_limit(self, reply)
            self._set_post_data_state()
            await self.push(reply)
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def push(self, status: Any) -> None:
        raw = status.encode("ascii", "replace") if isinstance(status, str) else bytes(status)
        rewritten = _REPLY_REWRITES.get(raw)
        if rewritten is not None:
            raw = rewritten
            # aiosmtpd enforces these limits itself, before our handler sees the message.
            self.on_limit(self, raw.decode())
        await super().push(raw)
