"""The canonical form of an email address, the one key every component looks an address up by.

The directory, the receiver's RCPT check, the webmail's log-in and its form
fields and the CLI all normalise with `normalize_address`, so `<Alice@Example.COM>`
and `alice@example.com` (or a Unicode domain and its IDNA form) are one
account everywhere.
"""

from __future__ import annotations

import re

from fallback.errors import InputError

_ADDRESS_RE = re.compile(r"^[^@\s{}<>\"(),;:\\\[\]]{1,64}@[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")
_CANONICAL_RE = re.compile(r"[a-z0-9._+-]{1,64}@[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})+")


def normalize_address(text: str) -> str:
    """Canonical form of an address (lower case, IDNA domain); InputError when it is not one."""
    if _CANONICAL_RE.fullmatch(text) and ".." not in text:
        return text  # already canonical: the common case of a large import
    addr = text.strip().strip("<>").strip()
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain:
        raise InputError(f"not an email address: {text!r}")
    if domain.isascii():
        # The common case, and the hot path of a million-line import: no IDNA codec.
        if any(not label or len(label) > 63 for label in domain.split(".")):
            raise InputError(f"not a valid domain: {domain!r}")
    else:
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise InputError(f"not a valid domain: {domain!r}") from None
    addr = f"{local.lower()}@{domain.lower()}"
    if not _ADDRESS_RE.match(addr):
        raise InputError(f"not an email address: {text!r}")
    return addr
