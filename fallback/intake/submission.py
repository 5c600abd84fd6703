"""A message composed in the webmail: its RFC 5322 bytes, and sending it where routing says.

Sending files exactly one copy in the sender's Sent folder: through
outbound.submit (Sent copy and durable queue entry in one MULTI/EXEC) when
there are remote recipients, or through delivery.deliver otherwise.  Each
other recipient goes where routing.decide says, exactly as if the message had
come in over SMTP: users of failed-over mailstores get it in their fallback
INBOX at once, users of healthy mailstores through the forward queue to the
main system; one recipient per transaction (no command touches two
mailboxes).  Our first header is a `Received: from webmail ... id <ID>` line
so reconcile can find the message by its id after a crash.

A per-message "sent once" key makes a resubmitted form (double click, reload)
harmless.  It is claimed ("sending", CLAIM_TTL) before anything is written and
becomes "sent" only once the message is filed; any failure before that (a
send limit, a message that cannot be built, Redis trouble) gives the claim
back, so the corrected form sends normally.  The per-user send limits
(sendlimits) are counted in the same attempt and given back on failure too.

With undo send (`undo_seconds`, fallback/queues/delayed.py) the Sent copy is
filed at once but nothing leaves: remote recipients, local copies and
forward entries all wait in the outbound record until the worker takes it.
"""

from __future__ import annotations

import contextlib
import email.policy
import email.utils
import mimetypes
import re
import time
from dataclasses import dataclass, field
from email.message import EmailMessage

import redis

from fallback import keys
from fallback.errors import InputError
from fallback.ids import new_id
from fallback.intake import routing, sendlimits
from fallback.intake.addressing import Policy
from fallback.mailbox import delivery, directory, fields, received, store
from fallback.maillog import MailLog
from fallback.ops.failover import ScopeCache
from fallback.queues import delayed, forward, outbound

ONCE_TTL = 7 * 86400
CLAIM_TTL = 120  # seconds: a send interrupted by a crash frees its form after this
SENT = b"sent"
IN_PROGRESS_POLLS, IN_PROGRESS_POLL = 30, 0.1  # how long a second submit waits for the first
VIA = "webmail"
NO_LIMITS = sendlimits.Limits(0, 0)
_CTYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
# In a text body, what SMTP may not carry raw (NUL, RFC 5321 4.1.4) or a reader's tools would
# take for line ends: such a body goes quoted-printable, which keeps every character.
_RAW_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]")


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
    references = (draft.references + " " + draft.in_reply_to).strip()
    if references:
        msg["References"] = references
    msg["User-Agent"] = "fallback webmail"
    body = draft.body.replace("\r\n", "\n")
    if body and not body.endswith("\n"):
        body += "\n"
    msg.set_content(body, charset="utf-8", cte="quoted-printable" if _RAW_UNSAFE.search(body) else None)
    for filename, ctype, data in draft.attachments:
        ctype = ctype or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        maintype, _, subtype = ctype.partition("/")
        if not (_CTYPE.fullmatch(maintype) and _CTYPE.fullmatch(subtype)):
            maintype, subtype = "application", "octet-stream"  # a browser's (or a sender's) odd type
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=email.policy.SMTP)


def _submit_later(r: redis.Redis, draft: Draft, routes: routing.Routes, raw: bytes, msg_id: str,
                  mailstore: str, hostname: str, client_ip: str, seconds: float, form: dict[str, str],
                  saved: str, counted: int) -> float:
    """Undo send: the Sent copy and one outbound record holding every delivery, due in `seconds`."""
    sender = draft.sender
    own_id = new_id()  # the sender's own copy needs its own id: Sent already holds this one

    def copy_id(addr: str) -> str:
        return own_id if addr == sender else msg_id

    extra = delayed.later_fields(
        [(m.address, m.mailstore, copy_id(m.address)) for m in routes.mailboxes],
        [(a, copy_id(a)) for a in routes.forward], received_line(own_id, hostname, client_ip),
        len(received_line(msg_id, hostname, client_ip)), form, saved, counted)
    due = time.time() + seconds
    outbound.submit(r, sender=sender, mailstore=mailstore, recipients=list(routes.outbound), raw=raw,
                    msg_id=msg_id, not_before=due, extra=extra)
    return due


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
    in_progress: bool = False  # another submit of this form is being sent (or was cut short)
    limited: sendlimits.Refusal | None = None  # over a send limit: nothing was sent
    held: bool = False  # the operator holds the sender's outbound mail: queued, not leaving yet
    undo_until: float = 0.0  # undo send: nothing leaves before this time (epoch seconds)


def send(r: redis.Redis, d: directory.Directory, scopes: ScopeCache, draft: Draft, msg_id: str,
         hostname: str, client_ip: str, limits: sendlimits.Limits = NO_LIMITS,
         policy: Policy | None = None, undo_seconds: float = 0.0,
         form: dict[str, str] | None = None, saved: str = "",
         log: MailLog | None = None) -> Outcome:
    """File the Sent copy, queue remote recipients, then each of the others; at most once per msg_id.

    Over a send limit nothing is written and `limited` says why.  InputError:
    the message cannot be built as typed, or a recipient's alias loops (nothing
    written either).  `policy`: the address resolution's settings (aliases,
    subaddresses and catch-alls are routed as the receiver routes them).
    `undo_seconds` > 0: everything waits that long (see the module's docstring);
    `form` and `saved` (the compose form and its draft id) are what Undo puts back.
    """
    sender = draft.sender
    once = keys.compose_once(sender, msg_id)
    if not r.set(once, "sending", nx=True, ex=CLAIM_TTL):
        # A double click: the first submit is usually done a moment later.
        for _ in range(IN_PROGRESS_POLLS):
            if r.get(once) == SENT:
                return Outcome(msg_id, already_sent=True)
            time.sleep(IN_PROGRESS_POLL)
        return Outcome(msg_id, in_progress=True)
    recipients = draft.recipients()
    counted = False
    try:
        try:
            body = build(draft, msg_id, sender.rpartition("@")[2])
        except ValueError as exc:  # what the form's checks did not catch: refused, not half-sent
            raise InputError(f"message not built: {exc}", public=(
                "This message cannot be sent as it is: a field holds a character mail cannot "
                "carry. Check To, Cc, Bcc, the subject and the attachments' names.")) from None
        refusal = sendlimits.reserve(r, sender, msg_id, len(recipients), limits)
        if refusal is not None:
            r.delete(once)
            return Outcome(msg_id, limited=refusal)
        counted = True
        mailbox = d.get(sender)
        mailstore = mailbox.mailstore if mailbox else directory.DEFAULT_MAILSTORE
        raw = received_line(msg_id, hostname, client_ip) + body
        routes = routing.route(d, scopes, recipients, policy)
        out = Outcome(msg_id, local=[m.address for m in routes.mailboxes], forwarded=list(routes.forward),
                      remote=list(routes.outbound))
        if undo_seconds > 0:
            out.held = bool(routes.outbound) and outbound.is_held(r, sender)
            out.undo_until = _submit_later(r, draft, routes, raw, msg_id, mailstore, hostname, client_ip,
                                           undo_seconds, form or {}, saved, len(recipients))
        elif routes.outbound:
            out.held = outbound.is_held(r, sender)
            outbound.submit(r, sender=sender, mailstore=mailstore, recipients=routes.outbound, raw=raw,
                            msg_id=msg_id)
        else:
            delivery.deliver(r, [delivery.Delivery(sender, mailstore, fields.SENT, (fields.SEEN,), "sent")],
                             msg_id, raw)
    except BaseException:
        # Nothing was filed: the user may try again with the same form.  If Redis is what
        # failed, the claim runs out after CLAIM_TTL instead.
        with contextlib.suppress(redis.RedisError):
            r.delete(once)
            if counted:
                sendlimits.refund(r, sender, msg_id, len(recipients))
        raise
    with contextlib.suppress(redis.RedisError):  # filed: a lost marker only shortens the guard
        r.set(once, SENT, ex=ONCE_TTL)
    log = log or MailLog()  # the webmail's counts (and message trace, issue 16)
    for addr in routes.outbound:
        log.queued(msg_id, sender, addr, route="outbound", via=VIA)
    if out.undo_until:
        return out  # the local copies and forward entries are the worker's, when due

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
