"""Reading a message's header fields, for display and for the few checks that need them.

Every caller that looks into a message's header block uses this module:
the receiver's display metadata (`summarize`), the outbound queue's
Message-ID/Date check (`names`), the DSN's copy of the original header
(`block`), DKIM's list of fields to sign (`names`).  They therefore agree on
where the header ends and which lines belong to it.

The rules are the standard library parser's (`email.parser.BytesHeaderParser`):
lines end at CRLF, CR or LF; a line starting with space or tab continues the
field before it; a line that is neither that nor `name:` ends the header (so
does the first empty line), except an mbox `From ` line or one starting with
a colon, which are skipped.  This is a hand-written scan and not the email
package because the receiver runs `summarize` for every message on its
event loop, where the email package's parser and header registry cost about
a millisecond a message; tests/test_headers.py checks the scan against the
stdlib parser on real messages and on random ones.  The raw bytes are never
rewritten: what is read here is only for display and checks.
"""

from __future__ import annotations

import contextlib
import email.header
import re

from fallback.mailbox import fields as F

DISPLAY_LIMIT = 512  # display metadata is truncated: the raw bytes keep everything

# A field name as the stdlib parser accepts it: printable ASCII except the colon, then a colon.
_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
_LINE = re.compile(rb"\r\n|\r|\n")
# An empty line: a line end right after a line end (a CR is a line end of its own only when
# no LF follows it).
_EMPTY_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")


def _lines(raw: bytes) -> list[bytes]:
    """The header's lines, without their line ends.

    The search for the empty line and the split run in C; only the header's
    own lines are looked at in Python (this runs for every message received).
    """
    if raw[:1] in (b"\r", b"\n"):
        return []
    lines = raw[: _header_end(raw)].splitlines()
    for n, line in enumerate(lines):
        if line[:1] not in (b" ", b"\t") and not _NAME.match(line) and not line.startswith(b"From "):
            del lines[n:]  # not a field: the body starts here, as the stdlib parser says
            break
    if len(lines) > 1 and lines[-1].startswith(b"From "):
        lines.pop()  # a `From ` line last in the header is taken for the body's first line
    return lines


def _header_end(raw: bytes) -> int:
    """Where the empty line after the header starts (the length of `raw` when there is none)."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    # Every line end before it a CRLF (as SMTP delivers mail): no empty line comes earlier, and
    # a search in C finds it; only other line ends need the pattern.
    crlf = head.count(b"\r\n")
    if head.count(b"\r") == crlf and head.count(b"\n") == crlf:
        return len(raw) if end < 0 else end
    m = _EMPTY_LINE.search(raw)
    return len(raw) if m is None else m.start()


def block(raw: bytes) -> bytes:
    """The header block as it came, without the line end after its last line."""
    count = len(_lines(raw))
    end = 0
    for m in _LINE.finditer(raw):
        if count == 0:
            break
        end, count = m.start(), count - 1
    else:
        if count:
            end = len(raw)  # the header runs to the end: no line end after it
    return raw[:end]


def fields(raw: bytes, wanted: frozenset[bytes] | None = None) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value with its continuation lines joined by CRLF) for each field, in order;
    only the names in `wanted` when given."""
    out: list[tuple[bytes, bytes]] = []
    current: list[bytes] | None = None
    name = b""
    for line in _lines(raw):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            out.append((name, b"\r\n".join(current)))
            current = None
        if line.startswith((b"From ", b":")):
            continue  # an mbox separator or a field without a name: skipped, as by the stdlib
        key, _, value = line.partition(b":")
        name = key.strip().lower()
        current = [value.lstrip(b" \t")] if wanted is None or name in wanted else None
    if current is not None:
        out.append((name, b"\r\n".join(current)))
    return out


def names(raw: bytes) -> set[str]:
    """Lower-case names of the header fields."""
    return {name.decode("ascii", "replace") for name, _ in fields(raw)}


def first(raw: bytes, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
    """The first value of each wanted field (lower-case names)."""
    found: dict[bytes, bytes] = {}
    for name, value in fields(raw, wanted):
        found.setdefault(name, value)
    return found


def display(value: bytes | None) -> str:
    """Unfolded, RFC 2047 decoded, whitespace collapsed, bounded; never raises."""
    if not value:
        return ""
    text = " ".join(value.decode("utf-8", "replace").split())
    if "=?" in text:
        # A malformed encoded word is shown as it came.
        with contextlib.suppress(Exception):
            text = " ".join(str(email.header.make_header(email.header.decode_header(text))).split())
    return text[:DISPLAY_LIMIT]


# Display metadata kept on each message hash: field -> header name.
_SUMMARY = {F.FROM: b"from", F.TO: b"to", F.CC: b"cc", F.SUBJECT: b"subject", F.DATE: b"date",
            F.MSGID: b"message-id"}
_SUMMARY_NAMES = frozenset((*_SUMMARY.values(), b"content-type", b"in-reply-to", b"references"))
# Issue 15 (conversations): what threading keeps of In-Reply-To and References: the well-formed
# ids only (mail anyone can send), the nearest THREAD_IDS of them.
_MSG_ID = re.compile(rb"<([!-;=?-~]{1,250})>")
THREAD_IDS = 20


def thread_ids(value: bytes | None, keep: int = THREAD_IDS) -> str:
    """The ids (without <>) in a threading header, the last `keep`, space separated."""
    if not value:
        return ""
    return " ".join(m.decode("ascii") for m in _MSG_ID.findall(value[:100_000])[-keep:])


def summarize(raw: bytes) -> dict[str, str]:
    """Display and threading metadata from the headers (fields.PARSED); never raises on bad input."""
    found = first(raw, _SUMMARY_NAMES)
    # NUL never reaches display metadata (it also separates the scripted write's fields).
    out = {key: display(found.get(name)).replace("\0", "") for key, name in _SUMMARY.items()}
    ctype = display(found.get(b"content-type")).lower()
    head = raw if len(raw) <= 1_000_000 else raw[:1_000_000]  # no copy of a message that fits
    has_attach = ctype.startswith("multipart/mixed") or b"attachment;" in head.lower()
    out[F.ATTACH] = "1" if has_attach else "0"
    out[F.INREPLYTO] = thread_ids(found.get(b"in-reply-to"), keep=1)
    out[F.REFERENCES] = thread_ids(found.get(b"references"))
    return out
