"""A message composed in the webmail: its RFC 5322 bytes, and sending it where routing says.

Sending files exactly one copy in the sender's Sent folder: through
outbound.submit (Sent copy and durable queue entry in one MULTI/EXEC) when
there are remote recipients, or through delivery.deliver otherwise.  Each
other recipient goes where routing.decide says, exactly as if the message had
come in over SMTP: users of failed-over mailstores get it in their fallback
INBOX at once, users of healthy mailstores through the forward queue to the
main system; one recipient per transaction (no command touches two
mailboxes).  Our first header is a `Received: from webmail ... id <ID>` line
so reconcile can find the message by its id after a crash.  A per-message
"sent once" key makes a resubmitted form (double click, reload) harmless.
"""

from __future__ import annotations

import email.policy
import email.utils
import mimetypes
from dataclasses import dataclass, field
from email.message import EmailMessage

import redis

from fallback import keys
from fallback.ids import new_id
from fallback.intake import routing
from fallback.mailbox import delivery, directory, fields, received, store
from fallback.maillog import MailLog
from fallback.ops.failover import ScopeCache
from fallback.queues import forward, outbound

ONCE_TTL = 7 * 86400
VIA = "webmail"


@dataclass
class Draft:
    sender: str
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    bcc: list[tuple[str, str]]
    subject: str
    body: str
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)
    in_reply_to: str = ""
    references: str = ""

    def recipients(self) -> list[str]:
        seen: list[str] = []
        for _, addr in self.to + self.cc + self.bcc:
            if addr not in seen:
                seen.append(addr)
        return seen


def build(draft: Draft, msg_id: str, domain: str) -> bytes:
    """The message as sent, without our Received: line; Bcc is never written into it."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = draft.sender
    if draft.to:
        msg["To"] = ", ".join(email.utils.formataddr(a) for a in draft.to)
    if draft.cc:
        msg["Cc"] = ", ".join(email.utils.formataddr(a) for a in draft.cc)
    if not draft.to and not draft.cc:
        msg["To"] = "undisclosed-recipients:;"
    msg["Subject"] = draft.subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = f"<{msg_id}@{domain}>"
    if draft.in_reply_to:
        msg["In-Reply-To"] = draft.in_reply_to
        msg["References"] = (draft.references + " " + draft.in_reply_to).strip()
    msg["User-Agent"] = "fallback webmail"
    body = draft.body.replace("\r\n", "\n")
    if body and not body.endswith("\n"):
        body += "\n"
    msg.set_content(body, charset="utf-8")
    for filename, ctype, data in draft.attachments:
        ctype = ctype or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        maintype, _, subtype = ctype.partition("/")
        if not subtype:
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=email.policy.SMTP)


def received_line(msg_id: str, hostname: str, client_ip: str) -> bytes:
    return received.received_header(msg_id, hostname, "webmail", client_ip, None, "HTTP", None)


@dataclass
class Outcome:
    msg_id: str
    already_sent: bool = False
    local: list[str] = field(default_factory=list)  # into a fallback mailbox here
    forwarded: list[str] = field(default_factory=list)  # forward queue: their mailstore is healthy
    remote: list[str] = field(default_factory=list)  # outbound queue
    failed_local: list[str] = field(default_factory=list)  # local or forward: not written, try again


def send(r: redis.Redis, d: directory.Directory, scopes: ScopeCache, draft: Draft, msg_id: str,
         hostname: str, client_ip: str) -> Outcome:
    """File the Sent copy, queue remote recipients, then each of the others; at most once per msg_id."""
    sender = draft.sender
    if not r.set(keys.compose_once(sender, msg_id), "1", nx=True, ex=ONCE_TTL):
        return Outcome(msg_id, already_sent=True)
    mailbox = d.get(sender)
    mailstore = mailbox.mailstore if mailbox else directory.DEFAULT_MAILSTORE
    body = build(draft, msg_id, sender.rpartition("@")[2])
    raw = received_line(msg_id, hostname, client_ip) + body
    routes = routing.route(d, scopes, draft.recipients())
    out = Outcome(msg_id, local=[m.address for m in routes.mailboxes], forwarded=list(routes.forward),
                  remote=list(routes.outbound))
    try:
        if routes.outbound:
            outbound.submit(r, sender=sender, mailstore=mailstore, recipients=routes.outbound, raw=raw,
                            msg_id=msg_id)
        else:
            delivery.deliver(r, [delivery.Delivery(sender, mailstore, fields.SENT, (fields.SEEN,), "sent")],
                             msg_id, raw)
    except BaseException:
        r.delete(keys.compose_once(sender, msg_id))  # nothing was filed: the user may try again
        raise
    log = MailLog()
    for addr in routes.outbound:
        log.queued(msg_id, sender, addr, route="outbound", via=VIA)

    def copy_for(addr: str) -> tuple[str, bytes]:
        # The sender's own copy needs its own id: Sent already holds this one.
        if addr != sender:
            return msg_id, raw
        copy_id = new_id()
        return copy_id, received_line(copy_id, hostname, client_ip) + body

    for box in routes.mailboxes:
        copy_id, copy_raw = copy_for(box.address)
        try:
            delivery.deliver(r, [box], copy_id, copy_raw)
            log.received(copy_id, sender, box.address, via=VIA)
        except redis.RedisError as exc:
            out.failed_local.append(box.address)
            log.failed(copy_id, sender, box.address, via=VIA, reason=str(exc))
    for addr in routes.forward:
        copy_id, copy_raw = copy_for(addr)
        try:
            forward.enqueue(r, [addr], copy_id, copy_raw, sender)
            log.queued(copy_id, sender, addr, route="forward", via=VIA)
        except redis.RedisError as exc:
            out.failed_local.append(addr)
            log.failed(copy_id, sender, addr, via=VIA, reason=str(exc))
    delivered = [a for a in out.local if a not in out.failed_local]
    store.note_local_recipients(r, sender, msg_id, delivered)
    return out
