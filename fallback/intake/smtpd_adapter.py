"""The one place that touches aiosmtpd's internals: our SMTP protocol subclass (with its base
class in smtpd_loop, the command loop).

aiosmtpd gives the receiver its SMTP state machine; the handler
(receiver.Receiver) sees only aiosmtpd's documented hooks (handle_MAIL,
handle_RCPT, handle_DATA, handle_exception) and the Session/Envelope they
are given.  What needs more than that lives here, and `RELIES_ON` names all
of it, so that an aiosmtpd upgrade fails in tests/test_smtpd_adapter.py
rather than in production:

* the connection caps per client prefix (clientlimits) and the whole-connection
  deadline (connection_made, connection_lost, transport, loop), kept by the idle timer;
* the idle timer (_reset_timeout, _timeout_cb, _timeout_handle), which aiosmtpd
  restarts before every command it knows: here only a command that moves a
  transaction forward restarts it, it is shorter while the receiver is under
  stress, and during DATA the client must keep up `min_data_rate` (data_received
  counts the bytes);
* the per-prefix message rate, judged when aiosmtpd hands MAIL FROM to the
  handler and counted when it hands over the message (_call_handler_hook);
* the short path for `<local@domain>` in MAIL/RCPT (_getaddr, local_part_limit), and
  MAIL's parameters (_getparams) refusing a SIZE in other than ASCII digits;
* DATA read in large pieces (smtpsyntax.read_data) instead of line by line:
  smtp_DATA replaced, with the pieces of the original it needs (_reader,
  _writer, check_helo_needed, check_auth_needed, _call_handler_hook,
  _set_post_data_state, data_size_limit, event_handler);
* our envelope (_create_envelope), which carries the message id and each
  recipient's mailstore from RCPT to DATA;
* aiosmtpd's own reply for a declared SIZE over the limit, rewritten into our
  enhanced code (push, SIZE_REPLY);
* the command loop (_handle_client) and the plain form of EHLO, HELO, MAIL, RCPT, RSET,
  NOOP and QUIT, answered with less work per line by our base class smtpd_loop.LeanSMTP (its names
  are listed here too);
* one instance per connection made without aiosmtpd's constructor each time
  (ProtocolFactory: a copy of a template's state, with the stream protocol's state,
  the command table _smtp_methods and the AUTH table _auth_methods made anew).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Callable
from types import MethodType
from typing import Any, Protocol

from aiosmtpd.smtp import Envelope, Session, _AuthMechAttr, syntax

from fallback.errors import MessageTooBig, TooManyConnections, TooManyMessages
from fallback.intake.addressing import Resolution
from fallback.intake.clientlimits import Client
from fallback.intake.connections import ConnectionTracker
from fallback.intake.smtpd_loop import LeanSMTP
from fallback.intake.smtpsyntax import read_data, simple_path

__all__ = ["RELIES_ON", "SIZE_REPLY", "FallbackEnvelope", "FallbackSMTP",
           "ProtocolFactory", "Session"]

log = logging.getLogger(__name__)

# What this module uses from aiosmtpd 1.4, checked by tests/test_smtpd_adapter.py:
# "SMTP.x" is on the class, "SMTP().x" on a connected instance, "SMTP(x=)" a constructor
# keyword, "Envelope().x" / "Session().x" on a fresh instance (the handler reads those).
RELIES_ON: tuple[str, ...] = (
    "aiosmtpd.smtp.SMTP", "aiosmtpd.smtp.Envelope", "aiosmtpd.smtp.Session", "aiosmtpd.smtp.syntax",
    "SMTP(data_size_limit=)", "SMTP(hostname=)", "SMTP(ident=)", "SMTP(tls_context=)",
    "SMTP(timeout=)", "SMTP(command_call_limit=)", "SMTP(enable_SMTPUTF8=)",
    "SMTP.line_length_limit", "SMTP.local_part_limit",
    "SMTP._getaddr", "SMTP._getparams", "SMTP._create_envelope", "SMTP._call_handler_hook",
    "SMTP._set_post_data_state", "SMTP.smtp_EHLO", "SMTP.command_size_limits",
    # smtpd_loop.LeanSMTP: the loop it replaces, and what that loop and the fast paths read.
    "aiosmtpd.smtp.ALLOWED_BEFORE_STARTTLS", "aiosmtpd.smtp.BOGUS_LIMIT",
    "aiosmtpd.smtp.TLSSetupException", "SMTP._handle_client", "SMTP.command_size_limit",
    "SMTP._set_rset_state", "SMTP.handle_exception", "SMTP()._enforce_call_limit",
    "SMTP()._call_limit_base", "SMTP()._call_limit_default", "SMTP()._tls_handshake_okay",
    "SMTP()._tls_protocol", "SMTP().require_starttls", "SMTP()._auth_required",
    "SMTP()._auth_require_tls", "SMTP()._ehlo_hook_ver", "SMTP()._decode_data",
    "SMTP().__ident__", "SMTP().hostname", "SMTP().enable_SMTPUTF8", "SMTP().tls_context",
    "SMTP()._proxy_timeout", "Envelope().smtp_utf8", "Session().authenticated",
    "aiosmtpd.smtp._AuthMechAttr", "SMTP()._smtp_methods", "SMTP()._auth_methods",
    "SMTP()._handle_hooks", "SMTP._cb_client_connected",
    "SMTP.check_helo_needed", "SMTP.check_auth_needed", "SMTP.push", "SMTP.smtp_DATA",
    "SMTP.connection_made", "SMTP.connection_lost", "SMTP.data_received",
    "SMTP._reset_timeout", "SMTP._timeout_cb", "SMTP()._timeout_handle",
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


# Commands whose 2xx reply moves a transaction forward, and so restarts the idle timer.
# NOOP, RSET, HELP, VRFY, EXPN and EHLO/HELO again do not: a client that sends only those
# is idle, and must not hold a connection slot for the whole connection_timeout.
_PROGRESS = frozenset({"MAIL", "RCPT", "DATA"})
IDLE_REPLY = "421 4.4.2 Idle time limit exceeded, closing"
SLOW_DATA_REPLY = "421 4.4.2 Data too slow, closing"


class FallbackEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        # Every accepted recipient -> its mailstore, in RCPT order (what routing.decide reads).
        self.mailstores: dict[str, str] = {}
        # Accepted recipients that are no mailbox (aliases, subaddresses, ...): what each reaches.
        self.resolved: dict[str, Resolution] = {}
        # Given at MAIL FROM, so the mail log ties rejections and the stored message together.
        self.msg_id = ""


class LimitLog(Protocol):
    """Told about a connection or message refused by a limit here (size, connection caps, message
    rate, idle or slow clients): the reply, and the reason for the log when it says more."""

    def __call__(self, conn: FallbackSMTP, reply: str, /, reason: str | None = None) -> None: ...


class FallbackSMTP(LeanSMTP):
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
        self.client = Client("", ())
        self.admitted = False
        self.storing = False
        # The whole-connection deadline (loop time), kept by the idle timer: one timer per
        # connection, not two (a new connection per message pays for each).
        self._ends_at = math.inf
        # The idle timer runs from the last progress (connection, TLS handshake, accepted MAIL,
        # RCPT, DATA); in DATA, bytes keep it going if they come at min_data_rate or faster.
        self._progress_at = 0.0
        self._progress_bytes = 0
        self._bytes_in = 0
        self._in_data = False
        self._in_hook = False

    def _create_envelope(self) -> FallbackEnvelope:
        return FallbackEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and not self.admitted:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if peer else "unknown"
            self.client = self.tracker.limits.client(self.peer_ip)
            if not self.tracker.admit(self, self.client):
                reply = TooManyConnections("connection cap").smtp_reply()
                transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                self.on_limit(self, reply, reason=self._cap_reason())
                return
            self.admitted = True
            self._ends_at = self.loop.time() + self.connection_timeout
        # A new connection, or (called again by STARTTLS) the TLS handshake done.
        self._progress_at, self._progress_bytes = self.loop.time(), self._bytes_in
        super().connection_made(transport)

    def _cap_reason(self) -> str:
        t = self.tracker
        if t.shutting_down:
            return "shutting down"
        if len(t.connections) >= t.total:
            return f"{t.total} connections in total"
        allowed = self.client.allowances(t.limits.connections_per_client)
        return ", ".join(f"{p} holds {t.by_prefix[p]} of {n} connections"
                         for p, n in zip(self.client.prefixes, allowed, strict=True))

    def connection_lost(self, error: Exception | None) -> None:
        if not self.admitted:
            return
        self.tracker.release(self, self.client)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._bytes_in += len(data)
        super().data_received(data)

    # --- the idle timer ---------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls this before every command it recognises, to restart its timer.  Ours
        # runs from the last progress instead, so NOOP and the like do not keep a connection
        # alive; and it is not restarted per command: when it fires it looks at the time of
        # the last progress and, if that is recent enough, waits for the rest.
        if self._timeout_handle is None or self._timeout_handle.cancelled():
            self.rearm()

    def rearm(self) -> None:
        """(Re)start the idle timer for what is left of the idle time since the last progress
        (at once when the idle time just got shorter: stress), or of the connection's time."""
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        left = min(self._progress_at + self.tracker.idle_timeout, self._ends_at) - self.loop.time()
        self._timeout_handle = self.loop.call_later(max(0.0, left), self._timeout_cb)

    def _progress(self) -> None:
        self._progress_at, self._progress_bytes = self.loop.time(), self._bytes_in

    def _timeout_cb(self) -> None:
        now = self.loop.time()
        if now >= self._ends_at:  # whatever it is doing, even waiting for the handler
            self._time_is_up()
            return
        if now < self._progress_at + self.tracker.idle_timeout:  # progress since it was set
            self.rearm()
            return
        if self._in_hook:
            # The handler (directory, storage) is the slow one, not the client: wait for it.
            self._progress()
            self.rearm()
            return
        if self._in_data:
            got = self._bytes_in - self._progress_bytes
            rate = self.tracker.limits.min_data_rate
            if got > 0 and got >= rate * (now - self._progress_at):
                self._progress()
                self.rearm()
                return
            reply = SLOW_DATA_REPLY
            reason = f"{got} bytes in {now - self._progress_at:.0f}s of DATA, under {rate} bytes/s"
        else:
            reply = IDLE_REPLY
            reason = f"no progress for {now - self._progress_at:.0f}s"
        self.on_limit(self, reply, reason=reason)
        self.close_with(reply.encode())

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        self._in_hook = True
        try:
            status = await self._over_message_rate() if command == "MAIL" else None
            if status is None:
                if command == "DATA":  # the message counts against its client's rate once it is in
                    self.tracker.limits.count_message(self.client)
                status = await super()._call_handler_hook(command, *args)
        finally:
            self._in_hook = False
        if command in _PROGRESS and isinstance(status, str) and status[:1] == "2":
            self._progress()
        return status

    async def _over_message_rate(self) -> str | None:
        """451 4.7.1 (logged) when this MAIL FROM is one message too many for the client's prefix."""
        limits = self.tracker.limits
        over = await limits.over_message_rate(self.client)
        if over is None:
            return None
        allowed = self.client.allowances(limits.messages_per_minute)[self.client.prefixes.index(over)]
        err = TooManyMessages(f"{over} over {allowed} messages a minute")
        self.on_limit(self, err.smtp_reply(), reason=err.reason)
        return err.smtp_reply()

    def _time_is_up(self) -> None:
        reply = "421 4.4.2 Connection time limit exceeded, closing"
        self.on_limit(self, reply, reason=f"connected for {self.connection_timeout:.0f}s")
        self.close_with(reply.encode())

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

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        # aiosmtpd checks SIZE with str.isdigit, which is true of "²" and other Unicode
        # digits that int() refuses: its MAIL then fails with a ValueError (a 451 and a
        # traceback).  Such a SIZE is a syntax error, as aiosmtpd answers for "SIZE=x".
        found = super()._getparams(params)
        size = found.get("SIZE") if found else None
        if isinstance(size, str) and not size.isascii():
            return None
        return found

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
        self._progress()
        self._in_data = True
        try:
            content = await read_data(self._reader, self.data_size_limit)
        except asyncio.CancelledError:
            log.info("connection from %s lost during DATA", self.peer_ip)
            self._writer.close()
            raise
        finally:
            self._in_data = False
        if content is None:
            reply = MessageTooBig("DATA over the limit").smtp_reply()
            self.on_limit(self, reply)
            self._set_post_data_state()
            await self.push(reply)
            return
        self.envelope.content = self.envelope.original_content = content
        del content  # the handler lets go of the envelope's reference: one copy held, not two
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


class ProtocolFactory:
    """Makes the FallbackSMTP of each new connection, at a fraction of aiosmtpd's constructor.

    SMTP.__init__ looks the handler and itself over (inspect.getmembers, dir) to build its
    tables of commands, hooks and AUTH mechanisms, and logs those: a fifth of the receiver's
    time when every message comes on a connection of its own (docs/performance.md, issue 17).
    The outcome is the same for every connection, so it is made once, on a template that
    never serves, and each connection's instance starts as a copy of the template's state
    with what must be its own made anew: the stream protocol's reader, futures and buffers
    (StreamReaderProtocol.__init__), the command and AUTH tables bound to it, and a copy of
    every other table.  tests/test_protocol_factory.py compares such an instance with one that
    aiosmtpd's constructor made.  As with aiosmtpd, the handler's hooks are looked up when
    the template is made, at the first connection: a hook replaced later is not seen."""

    def __init__(self, make: Callable[[], FallbackSMTP]) -> None:
        self.make = make
        self._template: FallbackSMTP | None = None
        self._tables: list[str] = []  # the template's other dict attributes, copied per connection

    def __call__(self) -> FallbackSMTP:
        template = self._template
        if template is None:  # made on the first connection: in the loop that serves
            template = self._template = self.make()
            # Found once: looking over every attribute per connection cost half the copy.
            self._tables = [k for k, v in vars(template).items()
                            if isinstance(v, dict) and k not in ("_smtp_methods", "_auth_methods")]
        conn: FallbackSMTP = FallbackSMTP.__new__(FallbackSMTP)
        state = conn.__dict__
        state.update(template.__dict__)
        for key in self._tables:
            state[key] = dict(state[key])
        asyncio.StreamReaderProtocol.__init__(
            conn, asyncio.StreamReader(loop=conn.loop, limit=conn.line_length_limit),
            client_connected_cb=conn._cb_client_connected, loop=conn.loop)
        conn._smtp_methods = {name: MethodType(method.__func__, conn)
                              for name, method in template._smtp_methods.items()}
        conn._auth_methods = {  # the built-in mechanisms are methods of the instance
            name: _AuthMechAttr(MethodType(mech.method.__func__, conn), True)  # type: ignore[attr-defined]
            if mech.is_builtin else mech
            for name, mech in template._auth_methods.items()}
        conn.command_size_limits.clear()  # as SMTP.__init__ does (a table of the class, not ours)
        return conn
