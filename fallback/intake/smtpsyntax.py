"""What the receiver reads off the SMTP wire: the path in MAIL/RCPT and the DATA stream.

aiosmtpd parses these itself, correctly but at a cost that decides the
receiver's throughput (docs/performance.md): every MAIL and RCPT runs the
`email` package's full header-address parser and even defines a class, and
DATA is read one line at a time with several steps per line.  Here the
common cases take a short path with exactly the same result, and anything
unusual still goes through aiosmtpd's own code.
"""

from __future__ import annotations

import asyncio
import re

# RFC 5321 Mailbox with a Dot-string local part and a dot-atom domain, in angle brackets:
# what nearly every MTA sends.  For these the header-address parser returns the text
# between the brackets unchanged (tests/test_smtp_syntax.py checks that against it).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*)@({_ATEXT}(?:\.{_ATEXT})*)>(.*)", re.DOTALL)

# The line holding a single dot that ends DATA, with the CRLF of the line before
# (RFC 5321 4.1.1.4); for the first line, DATA's own CRLF counts as that.
_END = b"\r\n.\r\n"
_DOT_LINE = b".\r\n"


def simple_path(arg: str, local_part_limit: int = 0) -> tuple[str, str] | None:
    """(address, rest after '>') for a plain `<local@domain>`, or None to let aiosmtpd parse it."""
    m = _SIMPLE_PATH.fullmatch(arg)
    if m is None or (local_part_limit and len(m[1]) > local_part_limit):
        return None
    rest = m[3]
    if rest[:1] in (" ", "\t"):  # the parser drops the whitespace after '>', as far as it goes
        rest = rest.lstrip()
    if rest[:1] == "(":  # a comment: the parser's business
        return None
    return f"{m[1]}@{m[2]}", rest


async def read_data(reader: asyncio.StreamReader, size_limit: int | None) -> bytes | None:
    """The message after DATA's 354, without the final dot line and with dot-stuffing removed.

    The same message aiosmtpd's own loop assembles (only CRLF ends a line, so
    `\\n.\\n` and the like stay inside the message), read in large pieces:
    each read stops at the next `.<CRLF>`, which is the end only when a CRLF
    comes right before it.  Nothing after the end is consumed, so a command
    the client sent straight after the dot is read as a command.  Returns
    None when the message was over `size_limit`; it is then read to its end
    and dropped, so the client gets its reply at the right moment (RFC 5321
    4.2.5) and memory holds no more than the limit.  Lines of any length
    are kept: the size limit already bounds memory, and refusing a long
    line would bounce mail that later hops accept.
    """
    parts: list[bytes] = []
    size = 0
    over = False
    tail = b"\r\n"
    while True:
        try:
            piece = await reader.readuntil(_DOT_LINE)
        except asyncio.LimitOverrunError as exc:
            # No `.<CRLF>` in the reader's buffer limit: take what is certainly not the end.
            piece = await reader.read(exc.consumed)
        size += len(piece)
        tail = piece[-5:] if len(piece) >= 5 else (tail + piece)[-5:]
        if not over:
            parts.append(piece)
            if size_limit and size > size_limit + len(_DOT_LINE):
                over = True
                parts.clear()
        if tail == _END:
            break
    if over:
        return None
    # The final dot line and a leading stuffed dot come off the pieces, so that the one
    # join is the only copy of the whole message (a large one is held once, not three times).
    cut = len(_DOT_LINE)
    while cut:
        last = parts.pop()
        if len(last) > cut:
            parts.append(last[:-cut])
        cut = max(0, cut - len(last))
    if parts and parts[0].startswith(b"."):
        parts[0] = parts[0][1:]
    data = b"".join(parts)
    parts.clear()
    return data.replace(b"\r\n.", b"\r\n")  # the same object when nothing was stuffed
