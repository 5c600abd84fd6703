"""Telling users about a failover: a notice to each affected user's alternate address.

`fallback failover start --notify` sends every affected user who has an
alternate address (provisioning's optional `alternate` column) the webmail's
URL; `failover stop --notify` tells them their mailbox works normally again.
Notices go through the outbound queue (fallback.queues.outbound.submit) like mail
sent from the webmail, so the worker retries them and DKIM signs them.

Once per user and failover episode: the mailbox's `notice` hash remembers,
for `start` and for `stop`, the declared-at time of the scope entry it was
told about.  Re-running the command for the same outage skips those already
told; a later outage (a new declared-at) tells them again.  The mark is set
before the notice is queued (and taken back if queuing fails), so two
operators running it at once cannot both send.

The sender is `notice_sender`, else postmaster@ the first provisioned domain:
an address that can receive the users' replies, since the receiver accepts
postmaster@ of every served domain (its alias, else `postmaster_address`,
else the main system; intake/addressing.py).
Its Sent copy (outbound.submit always files one: the worker delivers from it)
lands in that address's mailbox: when the sender is a provisioned mailbox it
is an ordinary sent message, reconciled into its real Sent folder; otherwise
it is kept under the mailstore name `notices` (shown by `fallback status`),
which reconcile and purge never touch, and goes away with the fallback's
data after the incident.
"""

from __future__ import annotations

import email.policy
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage

import redis

from fallback import ids, keys
from fallback.addresses import normalize_address
from fallback.config import Settings
from fallback.errors import InputError
from fallback.mailbox import received
from fallback.mailbox.directory import Directory, Mailbox
from fallback.ops import failover
from fallback.queues import outbound

START, STOP = "start", "stop"
NOTICES_MAILSTORE = "notices"

# Mark this mailbox as told about this episode; 0 when it already was.  KEYS: notice hash.
_CLAIM = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass
class Tally:
    queued: int = 0
    no_alternate: int = 0
    already: int = 0

    def describe(self, kind: str) -> str:
        what = "outage" if kind == START else "service restored"
        return (f"{self.queued} {what} notice(s) queued; {self.no_alternate} user(s) without an "
                f"alternate address skipped; {self.already} already told")


def sender_address(settings: Settings, directory: Directory) -> str:
    if settings.notice_sender:
        return normalize_address(settings.notice_sender)
    domains = sorted(directory.domains())
    if not domains:
        raise InputError("no notice sender: set notice_sender (no domain is provisioned)")
    return f"postmaster@{domains[0]}"


def episode(scope: failover.Scope, mailstore: str) -> str:
    """Which failover this is for a mailstore: when it was declared (or the scope as a whole was)."""
    declared = scope.mailstores.get(mailstore) if scope.mode == failover.LISTED else scope.since
    return "default" if declared is None else f"{declared:.3f}"


def compose(kind: str, mailbox: Mailbox, sender: str, settings: Settings) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = mailbox.alternate
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to this
    if kind == START:
        msg["Subject"] = f"Your mailbox {mailbox.address}: use the emergency webmail for now"
        text = (
            f"Hello,\n\nour main mail system has a problem, and your mailbox {mailbox.address} is "
            "affected.\nUntil it is fixed, read and send your mail in the emergency webmail:\n\n"
            f"    {settings.webmail_url}\n\nLog in there with your usual email address and password. "
            "New mail sent to you\narrives there. Your older mail is safe; it is back when the main "
            "system is,\ntogether with everything you receive and send in the meantime.\n\n"
            f"{settings.incident_message}\n")
    else:
        msg["Subject"] = f"Your mailbox {mailbox.address} works normally again"
        text = (
            f"Hello,\n\nyour mailbox {mailbox.address} works normally again: please use your usual "
            "mail\nprogram or webmail. New mail is delivered there. What you received and sent in\n"
            "the emergency webmail is copied into your mailbox; that can take a while.\n")
    msg.set_content(text + f"\n-- \n{sender}\n")
    return msg.as_bytes(policy=email.policy.SMTP)


def notify(r: redis.Redis, settings: Settings, directory: Directory, kind: str,
           scope: failover.Scope, mailboxes: Iterable[Mailbox]) -> Tally:
    """Queue a `kind` notice for each mailbox with an alternate address not yet told about its episode.

    `scope` is the one the episodes are read from: the new scope for START, the
    scope before the change for STOP.
    """
    if kind == START and not settings.webmail_url:
        raise InputError("--notify needs webmail_url (--webmail-url or FALLBACK_WEBMAIL_URL): "
                         "the notice tells users where to log in")
    sender = sender_address(settings, directory)
    own = directory.get(sender)
    sender_store = own.mailstore if own is not None else NOTICES_MAILSTORE
    hostname = settings.hostname or socket.gethostname()
    claim = r.register_script(_CLAIM)
    tally = Tally()
    for mailbox in mailboxes:
        if not mailbox.alternate:
            tally.no_alternate += 1
            continue
        marker = keys.notice_marker(mailbox.address)
        if not claim(keys=[marker], args=[kind, episode(scope, mailbox.mailstore)]):
            tally.already += 1
            continue
        msg_id = ids.new_id()
        raw = received.received_header(msg_id, hostname, "notices", "127.0.0.1", None, "local", None)
        raw += compose(kind, mailbox, sender, settings)
        try:
            outbound.submit(r, sender=sender, mailstore=sender_store, recipients=[mailbox.alternate],
                            raw=raw, msg_id=msg_id)
        except BaseException:
            r.hdel(marker, kind)  # not queued: a re-run must try this user again
            raise
        tally.queued += 1
    return tally
