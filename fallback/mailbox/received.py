"""Our `Received:` line: the trace header every stored message starts with.

It carries the message's unique id (`id <ULID>`), which reconcile searches
for in the main store after a crash, so it is the one header we write into
the raw bytes, with `Delivered-To:` when the recipient was an alias or a
subaddress (delivered_to).  Client-supplied names are sanitised: printable ASCII only.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time


def received_header(msg_id: str, hostname: str, helo: str, peer_ip: str, rdns: str | None,
                    protocol: str, recipient: str | None) -> bytes:
    """Our trace line; carries the unique id that reconcile searches for after a crash."""
    helo = _sanitize(helo) or "unknown"
    client = f"{helo} ({_sanitize(rdns) + ' ' if rdns else ''}[{_sanitize(peer_ip)}])"
    line = f"Received: from {client}\r\n\tby {_sanitize(hostname)} (fallback) with {protocol} id {msg_id}"
    if recipient:
        line += f"\r\n\tfor <{_sanitize(recipient)}>"
    line += f"; {_date(int(time.time()))}\r\n"
    return line.encode("ascii")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    # The line shows whole seconds: messages received in the same second share the text
    # (formatdate is a tenth of what building the line costs).
    return email.utils.formatdate(second, localtime=False)


def delivered_to(recipient: str) -> bytes:
    """`Delivered-To:` with the address a message was sent to when that is not the mailbox's own
    (a subaddress, an alias, a catch-all): it follows our Received: line, as Postfix's does."""
    return f"Delivered-To: {_sanitize(recipient)}\r\n".encode("ascii")


_UNSAFE_IN_TRACE = re.compile(r"[^\x21-\x7e]|[()<>;]")


def _sanitize(text: str | None) -> str:
    """Client-supplied names go into a header: printable ASCII only, no CR/LF, bounded."""
    if not text:
        return ""
    return _UNSAFE_IN_TRACE.sub("?", text[:200])

