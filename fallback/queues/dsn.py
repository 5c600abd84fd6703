"""Delivery status notifications: the RFC 3464 report a sender gets when a recipient fails.

A notice is a multipart/report (RFC 6522; report-type=delivery-status) of
three parts: a human explanation, the machine-readable message/delivery-status
(one per-message block, one block per failed recipient), and the original's
headers (text/rfc822-headers, so a large attachment is not mailed back).  It
is built from the delivery record alone, and placed in the sender's fallback
INBOX by the worker in the same transaction that marks the recipients failed.
"""

from __future__ import annotations

import email.utils
import re
import time
import uuid
from email.message import Message
from typing import Any, Protocol

from fallback.mailbox import headers

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
HEADERS_LIMIT = 64 * 1024


def status_of(reply: str, code: int) -> str:
    """The RFC 3463 status for the report: the server's own enhanced code, else one from the reply code."""
    m = _ENHANCED.search(reply)
    if m:
        return m.group(0)
    return "5.0.0" if 500 <= code < 600 else "4.0.0"


class Record(Protocol):
    """What a notice is built from: the delivery record (fallback.queues.outbound.Record)."""

    sender: str
    msg_id: str
    created: float
    rcpts: dict[str, dict[str, Any]]


def original_headers(raw: bytes) -> bytes:
    return headers.block(raw)[:HEADERS_LIMIT]


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False)


def build(hostname: str, rec: Record, failed: list[str], raw: bytes, smarthost: str | None,
          now: float | None = None) -> bytes:
    """The notice for `failed` recipients of one message, as bytes with CRLF line ends."""
    now = time.time() if now is None else now
    lines = [
        "This is the mail system at host " + hostname + ".",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below (headers only). The reason for each recipient:",
        "",
    ]
    for address in failed:
        st = rec.rcpts[address]
        lines.append(f"<{address}>: {st.get('reply') or 'delivery failed'}")
    human = "\r\n".join(lines) + "\r\n"

    per_message = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Fallback-Queue-ID: {rec.msg_id}",
        f"Arrival-Date: {_date(rec.created)}",
    ]
    blocks = ["\r\n".join(per_message)]
    for address in failed:
        st = rec.rcpts[address]
        reply = " ".join(str(st.get("reply") or "").split())
        block = [
            f"Final-Recipient: rfc822; {address}",
            f"Original-Recipient: rfc822; {address}",
            "Action: failed",
            f"Status: {st.get('status') or status_of(reply, int(st.get('code') or 0))}",
        ]
        if smarthost:
            block.append(f"Remote-MTA: dns; {smarthost.rpartition(':')[0].strip('[]')}")
        if reply and int(st.get("code") or 0):
            block.append(f"Diagnostic-Code: smtp; {reply}")
        elif reply:
            block.append(f"X-Diagnostic: {reply}")
        if st.get("last"):
            block.append(f"Last-Attempt-Date: {_date(float(st['last']))}")
        blocks.append("\r\n".join(block))
    status = "\r\n\r\n".join(blocks) + "\r\n"
    original = original_headers(raw).decode("utf-8", "replace").replace("\r\n", "\n")
    original = "\r\n".join(original.split("\n")) + "\r\n"

    domain = hostname or "localhost"
    boundary = f"=_report_{uuid.uuid4().hex}"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{domain}>",
        f"To: {rec.sender}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {_date(now)}",
        f"Message-ID: {email.utils.make_msgid('dsn', domain=domain)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    # Assembled by hand: the email package cannot serialise message/delivery-status
    # (a sequence of header blocks) without mangling it.
    parts = [
        ("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
         "Content-Description: Notification", human),
        ("Content-Type: message/delivery-status\r\nContent-Description: Delivery report", status),
        ("Content-Type: text/rfc822-headers; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
         "Content-Description: Undelivered Message Headers", original),
    ]
    body = "".join(f"--{boundary}\r\n{h}\r\n\r\n{b}" for h, b in parts) + f"--{boundary}--\r\n"
    text = "\r\n".join(head) + "\r\n\r\nThis is a MIME-encapsulated delivery status notification.\r\n" + body
    return text.encode("utf-8")


def parse(raw: bytes) -> Message:
    """A notice parsed back (tests and the webmail use it to show the per-recipient lines)."""
    from email import message_from_bytes
    from email.policy import default

    return message_from_bytes(raw, policy=default)
