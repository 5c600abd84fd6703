"""The compose form's fields: address lists and one-line header text, checked before anything is built.

Building and sending the message is fallback.intake.submission's job; this is
only what the HTTP side reads out of the form.
"""

from __future__ import annotations

import email.utils

from fallback.addresses import normalize_address
from fallback.errors import InputError

MAX_SUBJECT = 998


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
            normal = normalize_address(addr)
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
