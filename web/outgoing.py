"""A composed message: checking the form, building the RFC 5322 bytes, and sending it.

Sending files exactly one copy in the sender's Sent folder: through
outbound.submit (Sent copy and durable queue entry in one MULTI/EXEC) when
there are remote recipients, or through delivery.deliver when all recipients
have a mailbox here.  Local recipients get the message in their INBOX at
once, one mailbox per transaction (no command touches two mailboxes).  Our
first header is a `Received: from webmail ... id <ID>` line so reconcile can
find the message by its id after a crash.  A per-message "sent once" key makes
a resubmitted form (double click, reload) harmless.
"""

from __future__ import annotations

import email.policy
import email.utils
import mimetypes
from dataclasses import dataclass, field
from email.message import EmailMessage

import redis

from fallback import keys
from fallback.errors import InputError
from fallback.ids import new_id
from fallback.mailbox import delivery, directory, fields, received, store
from fallback.maillog import MailLog
from fallback.queues import outbound

ONCE_TTL = 7 * 86400
HEADER_FIELDS = {"to": "To", "cc": "Cc", "bcc": "Bcc", "subject": "Subject"}
MAX_SUBJECT = 998


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


def check_header_text(name: str, value: str) -> None:
    """CR or LF in a header value would start a new header: refused, never cleaned up."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise InputError(f"line break in {name}", public=f"{name} must be on one line "
                         "(line breaks are not allowed).")


def parse_addresses(name: str, value: str) -> list[tuple[str, str]]:
    """'Ann <a@x.org>, b@y.org' -> [(display name, normalised address)]; InputError names the bad one."""
    check_header_text(name, value)
    if not value.strip():
        return []
    out = []
    for piece in _split(value):
        display, addr = email.utils.parseaddr(piece)
        try:
            if not addr or "@" not in addr:
                raise InputError("no address")
            normal = directory.normalize_address(addr)
        except InputError:
            raise InputError(f"bad address in {name}", public=f"{name}: {piece.strip()!r} "
                             "is not an email address.") from None
        out.append((display, normal))
    return out


def _split(value: str) -> list[str]:
    """Split on commas and semicolons outside quotes and angle brackets."""
    parts, cur, quoted, angle = [], "", False, False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif ch == "<" and not quoted:
            angle = True
        elif ch == ">" and not quoted:
            angle = False
        if ch in ",;" and not quoted and not angle:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


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
    local: list[str] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    failed_local: list[str] = field(default_factory=list)


def send(r: redis.Redis, d: directory.Directory, draft: Draft, msg_id: str, hostname: str,
         client_ip: str) -> Outcome:
    """File the Sent copy, queue remote recipients, deliver local ones; at most once per msg_id."""
    sender = draft.sender
    if not r.set(keys.compose_once(sender, msg_id), "1", nx=True, ex=ONCE_TTL):
        return Outcome(msg_id, already_sent=True)
    mailbox = d.get(sender)
    mailstore = mailbox.mailstore if mailbox else directory.DEFAULT_MAILSTORE
    body = build(draft, msg_id, sender.rpartition("@")[2])
    raw = received_line(msg_id, hostname, client_ip) + body
    recipients = draft.recipients()
    local: dict[str, str] = {}
    for addr, value in zip(recipients, d.get_many(recipients), strict=True):
        if value is not None:
            local[addr] = directory.Mailbox.decode(addr, value).mailstore
    remote = [a for a in recipients if a not in local]
    out = Outcome(msg_id, local=list(local), remote=remote)
    try:
        if remote:
            outbound.submit(r, sender=sender, mailstore=mailstore, recipients=remote, raw=raw,
                            msg_id=msg_id)
        else:
            delivery.deliver(r, [delivery.Delivery(sender, mailstore, fields.SENT, (fields.SEEN,), "sent")],
                          msg_id, raw)
    except BaseException:
        r.delete(keys.compose_once(sender, msg_id))  # nothing was filed: the user may try again
        raise
    log = MailLog()
    for addr in remote:
        log.event("queued", id=msg_id, sender=sender, rcpt=addr, via="webmail")
    for addr, rcpt_store in local.items():
        # The sender's own INBOX copy needs its own id: Sent already holds this one.
        copy_id, copy_raw = msg_id, raw
        if addr == sender:
            copy_id = new_id()
            copy_raw = received_line(copy_id, hostname, client_ip) + body
        try:
            delivery.deliver(r, [delivery.Delivery(addr, rcpt_store)], copy_id, copy_raw)
            log.event("received", id=copy_id, sender=sender, rcpt=addr, via="webmail")
        except redis.RedisError as exc:
            out.failed_local.append(addr)
            log.event("failed", id=copy_id, sender=sender, rcpt=addr, via="webmail", reason=str(exc))
    delivered = [a for a in local if a not in out.failed_local]
    store.note_local_recipients(r, sender, msg_id, delivered)
    return out
