"""The SMTP receiver: the handler with the service's rules, and the listening server.

It refuses at the perimeter only (RCPT time: unknown user, foreign domain,
too many recipients; SIZE), and answers 250 to DATA only after the message
is written for every recipient in one durable atomic step.  Where each
recipient goes is routing.decide's answer: users of failed-over mailstores
get it in their fallback mailbox (`delivery.deliver_async`), everyone else's
mail goes to the forward queue for the main system (`forward.accept_async`,
which writes both kinds in one MULTI/EXEC when a message has both).
aiosmtpd's unsafe defaults are overridden: exceptions answer 451 4.3.0
(never 500 with the exception text), RCPT is checked against the directory
(never accept-all), and DATA always returns our own reply.  Everything that
touches aiosmtpd beyond its handler hooks is in smtpd_adapter.  Storage
cannot be exhausted: past the Redis memory reserve MAIL gets 452 4.3.1
(memoryguard); a fallback mailbox at its quota gets 452 4.2.2 at RCPT, and
a message that would take one over gets it after DATA, checked in the same
step as the write (mailbox/quota.py, deliverscript.py).  A recipient that is
no mailbox (alias, subaddress, catch-all, postmaster@) is resolved at RCPT by
intake/addressing.py and routed at DATA by routing.plan; an alias that loops
is 451 4.4.6, never a bounce.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time

import redis.asyncio as aioredis

from fallback.addresses import normalize_address
from fallback.config import Settings
from fallback.errors import (
    DirectoryUnavailable,
    FallbackError,
    InputError,
    MailboxFull,
    RelayDenied,
    StorageError,
    TooManyRecipients,
    UnknownUser,
)
from fallback.ids import new_id
from fallback.intake import addressing, routing
from fallback.intake.clientlimits import ClientLimits
from fallback.intake.connections import ConnectionTracker
from fallback.intake.memoryguard import MemoryGuard
from fallback.intake.smtpd_adapter import (
    FallbackEnvelope,
    FallbackSMTP,
    ProtocolFactory,
    Session,
)
from fallback.mailbox import aliases, compression, delivery, directory, quota, received
from fallback.mailbox.batcher import DeliveryBatcher
from fallback.mailbox.durability import ReplicaAcks
from fallback.mailbox.ttlcache import TtlCache
from fallback.maillog import MailLog
from fallback.ops import failover
from fallback.queues import forward
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)

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


class Receiver:
    """The aiosmtpd handler: directory checks at RCPT, durable storage at DATA."""

    def __init__(self, settings: Settings, r: aioredis.Redis, buckets: int,
                 maillog: MailLog | None = None) -> None:
        self.settings = settings
        self.r = r
        self.buckets = buckets
        self.hostname = settings.hostname or "localhost"
        self.maillog = maillog or MailLog()
        # Resolutions, mailboxes too: a cached mailbox carries the "no alias" it was found with.
        self.resolutions: TtlCache[addressing.Resolution] = TtlCache(settings.directory_cache_ttl)
        self.policy = addressing.Policy.of(settings)
        self.batcher = DeliveryBatcher(r)
        self.codec = compression.codec(settings.store_compression)  # issue 17: zstd or off
        self.guard = MemoryGuard(r, settings.memory_reserve)
        self.quota = settings.mailbox_quota
        self.usage = quota.UsageCache()
        self.scope = failover.ScopeCache(settings.failover_cache_ttl)
        self.replicas: ReplicaAcks | None = None
        self.clustered = is_cluster(r)

    async def prepare(self) -> None:
        """What needs the server: whether replicas must confirm each write, and how."""
        self.replicas = await ReplicaAcks.for_settings(self.r, self.settings)
        self.batcher.replicas = self.replicas

    # aiosmtpd's handler hooks: `envelope` is always ours (FallbackSMTP._create_envelope).

    async def handle_MAIL(self, server: FallbackSMTP, session: Session, envelope: FallbackEnvelope,
                          address: str, mail_options: list[str]) -> str:
        envelope.msg_id = new_id()
        # Past the memory reserve no new mail: the room above it is the webmail's (memoryguard).
        full = await self.guard.refusal()
        if full is not None:
            self.maillog.rejected(envelope.msg_id, address, "-", outcome=f"{full.code} {full.enhanced}",
                                  peer=server.peer_ip, reason=full.reason)
            return full.smtp_reply()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: FallbackSMTP, session: Session, envelope: FallbackEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
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
            addr = normalize_address(address)
        except InputError as exc:
            raise InputError(str(exc), code=553, enhanced="5.1.3",
                             public="Bad recipient address syntax") from None
        now = time.monotonic()
        # A mailbox without alias (the common case) costs one round trip (its directory and alias
        # buckets, pipelined), or nothing when cached: the whole resolution is cached, so a cached
        # mailbox cannot hide an alias of its address (addressing.py: an alias wins).
        res = self.resolutions.get(addr, now)
        if res is None:
            res = await self._resolve(addr)
            self.resolutions.put(addr, res, now)
        mailbox = res.mailboxes[0] if res.how == addressing.EXACT else None
        if mailbox is not None:
            if self.quota and (await self.scope.get_async(self.r)).covers(mailbox.mailstore):
                await self._check_quota(envelope, addr)
            envelope.mailstores[addr] = mailbox.mailstore
            return addr
        if self.quota:
            scope = await self.scope.get_async(self.r)
            for target in res.mailboxes:
                if scope.covers(target.mailstore):
                    await self._check_quota(envelope, target.address)
        envelope.resolved[addr] = res
        return addr

    async def _resolve(self, addr: str) -> addressing.Resolution:
        """What `addr` reaches; UnknownUser, RelayDenied, AliasLoop, or DirectoryUnavailable."""
        try:
            res = await addressing.resolve_async(self.r, self.buckets, addr, self.policy)
            if res is None:
                domain = addr.rpartition("@")[2]
                if (await directory.domain_known_async(self.r, domain)
                        or await aliases.domain_known_async(self.r, domain)):
                    raise UnknownUser(f"{addr} is not provisioned")
                raise RelayDenied(f"{domain} is not a provisioned domain")
        except FallbackError:
            raise
        except Exception as exc:
            raise DirectoryUnavailable(f"directory lookup for {addr}: {exc!r}") from exc
        return res

    async def _check_quota(self, envelope: FallbackEnvelope, addr: str) -> None:
        """A fallback mailbox at its quota, or one the declared SIZE would take over, is refused
        here, for this recipient only; the rest is checked with the write (deliverscript.py)."""
        declared = next((int(o[5:]) for o in envelope.mail_options
                         if o[:5].upper() == "SIZE=" and o[5:].isascii() and o[5:].isdigit()), None)
        try:
            used = await self.usage.usage(self.r, addr, time.monotonic())
        except Exception as exc:
            # Only the early answer is lost: the write checks the quota again, or fails (451).
            log.debug("quota of %s not read at RCPT: %r", addr, exc)
            return
        if quota.refused_at_rcpt(used, self.quota, declared):
            await self._note_full(addr)
            raise MailboxFull(f"{addr} holds {used} bytes of its quota of {self.quota}"
                              + (f"; declared SIZE {declared}" if declared is not None else ""))

    async def _note_full(self, addr: str) -> None:
        try:
            await quota.note_refused(self.r, addr)
        except Exception as exc:  # only `fallback status`'s list of full mailboxes misses it
            log.warning("could not note %s as full: %r", addr, exc)

    async def handle_DATA(self, server: FallbackSMTP, session: Session, envelope: FallbackEnvelope) -> str:
        """Store for every recipient in one durable write; only then 250.  Anything else: 451."""
        msg_id = envelope.msg_id or new_id()
        size = len(envelope.original_content or b"")
        server.storing = True
        started = time.monotonic()
        try:
            digest = self._digest(envelope) if self.clustered and len(envelope.rcpt_tos) > 1 else None
            # One read of the scope for the whole message: every recipient is judged alike.
            routes = routing.plan(envelope.mailstores, envelope.resolved.values(),
                                  await self.scope.get_async(self.r), self.quota)
            boxes = routes.mailboxes
            copies, fixed = self._with_trace(server, session, envelope, msg_id, boxes,
                                             forwarding=bool(routes.forward))
            raw = copies[0][1]  # with forwards: the copy that names nobody but a single recipient
            size = len(raw)
            if routes.forward:
                # aiosmtpd spells the null sender (MAIL FROM:<>) "<>"; the record keeps "".
                sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
                await forward.accept_async(self.r, copies, routes.forward, msg_id, raw,
                                           sender or "", self.replicas, digest, self.codec)
            elif len(copies) == 1:  # most messages: one copy for all, the batched fast path
                await delivery.deliver_async(self.r, boxes, msg_id, raw, batcher=self.batcher,
                                             digest=digest, how=self.codec)
            else:
                await delivery.deliver_copies_async(self.r, copies, msg_id, self.replicas, digest,
                                                    self.codec)
            del raw
        except MailboxFull as full:
            # Nothing was stored (on a cluster: the parts stored are guarded, the retry completes
            # them): the whole message waits, and the sender's retry finds the full mailbox
            # refused at RCPT when it declares SIZE (as MTAs do), so the others get it then.
            if full.address:
                await self._note_full(full.address)
            for rcpt in envelope.rcpt_tos:
                self.maillog.rejected(msg_id, envelope.mail_from, rcpt, peer=server.peer_ip,
                                      outcome=f"{full.code} {full.enhanced}", reason=full.reason)
            return full.smtp_reply()
        except Exception as exc:
            err = StorageError(f"storing {msg_id}: {exc!r}")
            log.warning("%s", err.reason)
            for rcpt in envelope.rcpt_tos:
                self.maillog.deferred(msg_id, envelope.mail_from, rcpt, size=size,
                                      outcome=f"{err.code} {err.enhanced}", peer=server.peer_ip,
                                      reason=err.reason)
            return err.smtp_reply()
        finally:
            server.storing = False
        took = f"{(time.monotonic() - started) * 1000:.1f}ms"
        for group, copy in copies:
            for d in group:
                self.usage.stored(d.address, len(copy))
                self.maillog.received(msg_id, envelope.mail_from, d.address, size=len(copy),
                                      peer=server.peer_ip, took=took, fixed_line_ends=fixed)
        for rcpt in routes.forward:
            self.maillog.queued(msg_id, envelope.mail_from, rcpt, route="forward", size=size,
                                peer=server.peer_ip, took=took, fixed_line_ends=fixed)
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
                    msg_id: str, boxes: list[delivery.Delivery],
                    forwarding: bool) -> tuple[list[tuple[list[delivery.Delivery], bytes]], bool]:
        """The stored copies: our Received: line, then the message with bare CR/LF made CRLF
        (see normalize_line_ends), as (mailboxes, bytes) pairs; always at least one pair.

        A mailbox reached through one other address (alias, subaddress, ...) gets a copy naming
        it (`for <...>` and Delivered-To:, like Postfix's per-recipient copy), so the user and
        reconcile see which; the others share one copy that names nobody unless the message had
        one recipient (so a Bcc stays hidden).  `forwarding`: that shared copy comes first even
        with no mailbox in it, for the forward records to carry to the main system.
        The envelope lets go of the message as it is read, so that a large one is held at
        most once per copy while the stored bytes are built (docs/performance.md)."""
        content = envelope.original_content or b""
        envelope.content = envelope.original_content = None
        body, fixed = normalize_line_ends(content)
        del content  # when the line ends were fixed, `body` is a new copy: the old one goes now
        protocol = "ESMTPS" if session.ssl else ("ESMTP" if session.extended_smtp else "SMTP")
        single = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        groups: dict[str | None, list[delivery.Delivery]] = {None: []} if forwarding else {}
        if single is not None or not envelope.resolved:
            groups[None] = boxes
        else:
            reached: dict[str, list[str]] = {}
            for res in envelope.resolved.values():
                for m in res.mailboxes:
                    reached.setdefault(m.address, []).append(res.address)
            for d in boxes:
                origins = reached.get(d.address, [])
                own = d.address in envelope.mailstores or len(origins) != 1
                groups.setdefault(None if own else origins[0], []).append(d)
        copies = []
        for via, group in groups.items():
            named = via or single
            header = received.received_header(msg_id, self.hostname, session.host_name or "",
                                              server.peer_ip, None, protocol, named)
            if named is not None and named in envelope.resolved:
                header += received.delivered_to(named)
            copies.append((group, header + body))
        return copies, fixed

    def log_limit(self, server: FallbackSMTP, reply: str, reason: str | None = None) -> None:
        """A message or connection refused by a limit in smtpd_adapter (SIZE, connection caps,
        message rate, idle or slow client): one mail-log line per recipient, like ours."""
        envelope = server.envelope
        sender = envelope.mail_from if envelope is not None else None
        rcpts = (envelope.rcpt_tos if envelope is not None else None) or ["-"]
        msg_id = getattr(envelope, "msg_id", "") or "-"
        for rcpt in rcpts:
            self.maillog.rejected(msg_id, sender, rcpt, outcome=reply[:9], peer=server.peer_ip,
                                  reason=reason or reply[10:])

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's "500 Error: (Type) text": unknown trouble is temporary.
        log.error("SMTP session error: %r", error, exc_info=error)
        return StorageError(repr(error)).smtp_reply()

    def _log_reject(self, session: Session, envelope: FallbackEnvelope, address: str,
                    exc: FallbackError) -> None:
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        self.maillog.rejected(envelope.msg_id or "-", envelope.mail_from, address,
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
        self.tracker = ConnectionTracker(settings.max_connections, ClientLimits(settings, r))
        self.tls = tls_context(settings)
        self.reuse_port = reuse_port
        self.server: asyncio.Server | None = None
        self.protocols = ProtocolFactory(self._protocol)

    def _protocol(self) -> FallbackSMTP:
        s = self.settings
        return FallbackSMTP(
            self.handler, self.tracker, on_limit=self.handler.log_limit,
            connection_timeout=s.connection_timeout, idle_timeout=s.idle_timeout,
            max_message_size=s.max_message_size, max_commands=s.max_commands,
            hostname=self.handler.hostname, tls=self.tls,
        )

    async def start(self) -> int:
        await self.handler.prepare()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self.protocols, host=self.settings.smtp_host, port=self.settings.smtp_port,
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
        await self.tracker.limits.aclose()  # the message counts of the last moment go to Redis
        await self.handler.batcher.aclose()
