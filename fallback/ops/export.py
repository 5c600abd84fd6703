"""Writing a mailbox out as files an operator can hand to a user.

Maildir: one file per message holding exactly the stored bytes (INBOX in the
top level, other folders as Maildir++ `.Sent`, `.Trash`).  mbox: mboxrd, so a
body line `From ...` (or `>From ...`) gains one `>` and readers can undo it
exactly; the message bytes are otherwise unchanged.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from fallback.mailbox.fields import ANSWERED, DRAFT, FLAGGED, FOLDERS, INBOX, SEEN, TRASH
from fallback.mailbox.store import MailboxReader

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_MAILDIR_FLAGS = {SEEN: "S", FLAGGED: "F", ANSWERED: "R", DRAFT: "D"}


def mboxrd_quote(raw: bytes) -> bytes:
    return _FROM_LINE.sub(rb">\1", raw)


def mboxrd_unquote(quoted: bytes) -> bytes:
    return re.sub(rb"^>(>*From )", rb"\1", quoted, flags=re.MULTILINE)


def _envelope_sender(meta: dict[str, str]) -> str:
    from email.utils import parseaddr

    addr = parseaddr(meta.get("from", ""))[1]
    return addr if addr and " " not in addr else "MAILER-DAEMON"


def write_mbox(reader: MailboxReader, path: Path, folders: tuple[str, ...] = FOLDERS) -> int:
    count = 0
    with open(path, "wb") as out:
        for _, meta, raw in reader.iter_messages(folders):
            when = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(int(meta.get("ts", "0")) / 1000))
            out.write(f"From {_envelope_sender(meta)} {when}\n".encode())
            # The message, then one separating newline that the reader drops.
            out.write(mboxrd_quote(raw))
            out.write(b"\n")
            count += 1
    return count


def write_maildir(reader: MailboxReader, path: Path, folders: tuple[str, ...] = FOLDERS) -> int:
    """Maildir++: INBOX at the top, `.Sent` and `.Trash` beside; exact bytes, flags in names."""
    host = socket.gethostname().replace("/", "_").replace(":", "_")
    count = 0
    for msg_id, meta, raw in reader.iter_messages(folders):
        name = meta.get("folder", INBOX)
        root = path if name == INBOX else path / f".{name}"
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        flags = {_MAILDIR_FLAGS[f] for f in meta.get("flags", "").split() if f in _MAILDIR_FLAGS}
        if name == TRASH:
            flags.add("T")
        unique = f"{int(meta.get('ts', '0')) // 1000}.{msg_id}.{host}"
        tmp = root / "tmp" / unique
        # Write in tmp/ and rename into cur/: a reader never sees half a message.
        with open(tmp, "xb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, root / "cur" / f"{unique}:2,{''.join(sorted(flags))}")
        count += 1
    return count


def iter_mbox(path: Path) -> Iterator[bytes]:
    """Read back what write_mbox wrote (used by tests and by operators' scripts)."""
    data = path.read_bytes()
    # Quoting leaves no body line starting with "From ": each one is a separator.
    starts = list(re.finditer(rb"^From [^\n]*\n", data, flags=re.MULTILINE))
    bodies = [m.end() for m in starts]
    ends = [m.start() for m in starts[1:]] + [len(data)]
    for begin, end in zip(bodies, ends, strict=True):
        yield mboxrd_unquote(data[begin : end - 1])
