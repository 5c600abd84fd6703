"""The SMTP receiver: aiosmtpd with the service's rules.

It refuses at the perimeter only (RCPT time: unknown user, foreign domain,
too many recipients; SIZE), and answers 250 to DATA only after the message
is written for every recipient in one durable atomic step.  Each recipient
goes where the failover scope says: users of failed-over mailstores get it
in their fallback mailbox (`delivery.deliver_async`), everyone else's mail goes
to the forward queue for the main system (`forward.accept_async`, which
writes both kinds in one MULTI/EXEC when a message has both).
aiosmtpd's unsafe defaults are overridden: exceptions answer 451 4.3.0
(never 500 with the exception text), RCPT is checked against the directory
(never accept-all), and DATA always returns our own reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from fallback.config import Settings
from fallback.errors import (
    DirectoryUnavailable,
    FallbackError,
    InputError,
    MessageTooBig,
    RelayDenied,
    StorageError,
    TooManyConnections,
    TooManyRecipients,
    UnknownUser,
)
from fallback.ids import new_id
from fallback.intake.smtpsyntax import read_data, simple_path
from fallback.mailbox import delivery, directory, received
from fallback.mailbox.durability import ReplicaAcks
from fallback.maillog import MailLog
from fallback.ops import failover
from fallback.queues import forward
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

# aiosmtpd's own reply for the limit it enforces itself (SIZE in MAIL), given our enhanced code.
_REPLY_REWRITES = {
    b"552 Error: message size exceeds fixed maximum message size":
        MessageTooBig("declared SIZE over the limit").smtp_reply().encode(),
}
_LINE_END = re.compile(rb"\r\n|\r|\n")


def normalize_line_ends(data: bytes) -> tuple[bytes, bool]:
    """Bare CR and bare LF become CRLF.

    aiosmtpd only ends DATA at CRLF.CRLF, so `\\n.\\n`, `\\r.\\r` or `\\n.\\r\\n` stay
    inside this message; turning them into real line ends means that any later
    SMTP hop dot-stuffs them, so a smuggled "second message" can never escape
    this one.  Returns (bytes, whether anything changed).
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data, False
    return _LINE_END.sub(b"\r\n", data), True


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
        self.mailstores: dict[str, str] = {}
        # Given at MAIL FROM, so the mail log ties rejections and the stored message together.
        self.msg_id = ""


class FallbackSMTP(SMTP):
    # aiosmtpd's stream buffer limit: the longest command line, and the largest piece
    # DATA is read in.  DATA lines themselves may be longer than RFC 5322's 998 octets
    # (HTML from bad generators): refusing them would bounce real mail.
    line_length_limit = 1024 * 1024

    def __init__(self, handler: Receiver, tracker: ConnectionTracker,
                 connection_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.tracker = tracker
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
            if isinstance(self.event_handler, Receiver):
                self.event_handler.log_limit(self, reply)
            self._set_post_data_state()
            await self.push(reply)
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    @property
    def busy(self) -> bool:
        """Inside a transaction: shutdown waits for it instead of cutting it."""
        return self.storing or (self.envelope is not None and self.envelope.mail_from is not None)

    async def push(self, status: Any) -> None:
        raw = status.encode("ascii", "replace") if isinstance(status, str) else bytes(status)
        rewritten = _REPLY_REWRITES.get(raw)
        if rewritten is not None:
            raw = rewritten
            # aiosmtpd enforces these limits itself, before our handler sees the message.
            if isinstance(self.event_handler, Receiver):
                self.event_handler.log_limit(self, raw.decode())
        await super().push(raw)


class Receiver:
    """The aiosmtpd handler: directory checks at RCPT, durable storage at DATA."""

    def __init__(self, settings: Settings, r: aioredis.Redis, buckets: int,
                 maillog: MailLog | None = None) -> None:
        self.settings = settings
        self.r = r
        self.buckets = buckets
        self.hostname = settings.hostname or "localhost"
        self.maillog = maillog or MailLog()
        self.cache = directory.LookupCache(settings.directory_cache_ttl)
        self.batcher = delivery.DeliveryBatcher(r)
        self.scope = failover.ScopeCache(settings.failover_cache_ttl)
        self.replicas: ReplicaAcks | None = None
        self.clustered = is_cluster(r)

    async def prepare(self) -> None:
        """What needs the server: whether replicas must confirm each write, and how."""
        self.replicas = await ReplicaAcks.for_settings(self.r, self.settings)
        self.batcher.replicas = self.replicas

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        assert isinstance(envelope, FallbackEnvelope)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.msg_id = new_id()
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        assert isinstance(envelope, FallbackEnvelope)
        try:
            addr = await self._check_recipient(envelope, address)
        except FallbackError as exc:
            self._log_reject(session, envelope, address, exc)
            return exc.smtp_reply()
        if addr not in envelope.rcpt_tos:  # a repeated RCPT must not deliver twice
            envelope.rcpt_tos.append(addr)
        return "250 2.1.5 Recipient OK"

    async def _check_recipient(self, envelope: FallbackEnvelope, address: str) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            raise TooManyRecipients(f"more than {self.settings.max_recipients} recipients")
        try:
            addr = directory.normalize_address(address)
        except InputError as exc:
            raise InputError(str(exc), code=553, enhanced="5.1.3",
                             public="Bad recipient address syntax") from None
        now = time.monotonic()
        try:
            mailbox = self.cache.get(addr, now) or await directory.lookup_async(self.r, self.buckets, addr)
            if mailbox is None:
                domain = addr.rpartition("@")[2]
                if await directory.domain_known_async(self.r, domain):
                    raise UnknownUser(f"{addr} is not provisioned")
                raise RelayDenied(f"{domain} is not a provisioned domain")
        except FallbackError:
            raise
        except Exception as exc:
            raise DirectoryUnavailable(f"directory lookup for {addr}: {exc!r}") from exc
        self.cache.put(mailbox, now)
        envelope.mailstores[addr] = mailbox.mailstore
        return addr

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store for every recipient in one durable write; only then 250.  Anything else: 451."""
        assert isinstance(envelope, FallbackEnvelope) and isinstance(server, FallbackSMTP)
        msg_id = envelope.msg_id or new_id()
        size = len(envelope.original_content or b"")
        server.storing = True
        started = time.monotonic()
        try:
            raw, fixed = self._with_trace(server, session, envelope, msg_id)
            size = len(raw)
            # One read of the scope for the whole message: every recipient is judged alike.
            scope = await self.scope.get_async(self.r)
            deliveries = [delivery.Delivery(a, envelope.mailstores[a]) for a in envelope.rcpt_tos
                          if scope.covers(envelope.mailstores[a])]
            forwards = [a for a in envelope.rcpt_tos if not scope.covers(envelope.mailstores[a])]
            digest = self._digest(envelope) if self.clustered and len(envelope.rcpt_tos) > 1 else None
            if forwards:
                # aiosmtpd spells the null sender (MAIL FROM:<>) "<>"; the record keeps "".
                sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
                await forward.accept_async(self.r, deliveries, forwards, msg_id, raw, sender or "",
                                           self.replicas, digest)
            else:
                await delivery.deliver_async(self.r, deliveries, msg_id, raw, batcher=self.batcher,
                                          digest=digest)
        except Exception as exc:
            err = StorageError(f"storing {msg_id}: {exc!r}")
            log.warning("%s", err.reason)
            for rcpt in envelope.rcpt_tos:
                self.maillog.event("deferred", id=msg_id, **{"from": envelope.mail_from}, to=rcpt,
                                   size=size, outcome=f"{err.code} {err.enhanced}", peer=server.peer_ip,
                                   reason=err.reason)
            return err.smtp_reply()
        finally:
            server.storing = False
        took = f"{(time.monotonic() - started) * 1000:.1f}ms"
        for rcpt in envelope.rcpt_tos:
            queued = rcpt in forwards
            self.maillog.event("queued" if queued else "received", id=msg_id,
                               **{"from": envelope.mail_from}, to=rcpt, size=size, outcome="250",
                               peer=server.peer_ip, store=took, route="forward" if queued else "mailbox",
                               fixed_line_ends="yes" if fixed else None)
        return f"250 2.0.0 OK id={msg_id}"

    @staticmethod
    def _digest(envelope: FallbackEnvelope) -> str:
        """What makes a retried transaction recognisable as the same message (keys.dedupe):
        sender, recipients and the bytes as the client sent them (before our Received:)."""
        h = hashlib.sha256()
        h.update(f"{envelope.mail_from}\0{' '.join(sorted(envelope.rcpt_tos))}\0".encode())
        h.update(envelope.original_content or b"")
        return h.hexdigest()[:32]

    def _with_trace(self, server: FallbackSMTP, session: Session, envelope: FallbackEnvelope,
                    msg_id: str) -> tuple[bytes, bool]:
        """Our Received: line, then the message with bare CR/LF made CRLF (see normalize_line_ends)."""
        body, fixed = normalize_line_ends(envelope.original_content or b"")
        protocol = "ESMTPS" if session.ssl else ("ESMTP" if session.extended_smtp else "SMTP")
        single = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        header = received.received_header(msg_id, self.hostname, session.host_name or "",
                                       server.peer_ip, None, protocol, single)
        return header + body, fixed

    def log_limit(self, server: FallbackSMTP, reply: str) -> None:
        """A message aiosmtpd refused itself (SIZE): one mail-log line per recipient, like ours."""
        envelope = server.envelope
        sender = envelope.mail_from if envelope is not None else None
        rcpts = (envelope.rcpt_tos if envelope is not None else None) or ["-"]
        msg_id = getattr(envelope, "msg_id", "") or "-"
        for rcpt in rcpts:
            self.maillog.event("rejected", id=msg_id, **{"from": sender}, to=rcpt,
                               outcome=reply[:9], peer=server.peer_ip, reason=reply[10:])

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's "500 Error: (Type) text": unknown trouble is temporary.
        log.error("SMTP session error: %r", error, exc_info=error)
        return StorageError(repr(error)).smtp_reply()

    def _log_reject(self, session: Session, envelope: Envelope, address: str,
                    exc: FallbackError) -> None:
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        msg_id = getattr(envelope, "msg_id", "") or "-"
        self.maillog.event("rejected", id=msg_id, **{"from": envelope.mail_from}, to=address,
                           outcome=f"{exc.code} {exc.enhanced}", peer=peer, reason=exc.reason)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return ctx


class ReceiverServer:
    """A listening receiver with graceful shutdown."""

    def __init__(self, settings: Settings, r: aioredis.Redis, buckets: int,
                 maillog: MailLog | None = None, reuse_port: bool = False) -> None:
        self.settings = settings
        self.handler = Receiver(settings, r, buckets, maillog)
        self.tracker = ConnectionTracker(settings.max_connections, settings.max_connections_per_ip)
        self.tls = tls_context(settings)
        self.reuse_port = reuse_port
        self.server: asyncio.Server | None = None

    def _protocol(self) -> FallbackSMTP:
        s = self.settings
        return FallbackSMTP(
            self.handler, self.tracker, s.connection_timeout,
            data_size_limit=s.max_message_size, hostname=self.handler.hostname,
            ident="fallback ESMTP", tls_context=self.tls, timeout=s.idle_timeout,
            command_call_limit=s.max_commands, enable_SMTPUTF8=True,
        )

    async def start(self) -> int:
        await self.handler.prepare()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol, host=self.settings.smtp_host, port=self.settings.smtp_port,
            reuse_port=self.reuse_port or None,
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; let transactions in flight finish; then say 421 to the rest."""
        self.tracker.shutting_down = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + grace
        while self.tracker.connections and time.monotonic() < deadline:
            for conn in list(self.tracker.connections):
                if not conn.busy:
                    conn.close_with(b"421 4.3.2 Service shutting down")
            await asyncio.sleep(0.05)
        for conn in list(self.tracker.connections):
            conn.close_with(b"421 4.3.2 Service shutting down")
        if self.server is not None:
            await self.server.wait_closed()
