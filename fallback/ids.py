"""Unique, time-ordered message ids (ULID layout: 48-bit ms time + 80 random bits, base32)."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I L O U


# Two characters at a time: every 10-bit group's pair, most significant character first.  The
# receiver makes an id per message; 13 lookups cost a third of 26 shifts and appends.
_PAIRS = tuple(hi + lo for hi in _ALPHABET for lo in _ALPHABET)
_SHIFTS = tuple(range(120, -1, -10))  # 13 groups of 10 bits = the 26 characters' 130 bits


def new_id(now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return encode((ms << 80) | secrets.randbits(80))


def encode(value: int) -> str:
    """The 26 characters of a 128-bit value (the top two of their 130 bits are zero)."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def id_time_ms(msg_id: str) -> int:
    # The first 10 characters are exactly the 48-bit millisecond time.
    value = 0
    for ch in msg_id[:10]:
        value = (value << 5) | _ALPHABET.index(ch)
    return value


def is_id(text: str) -> bool:
    return len(text) == 26 and all(ch in _ALPHABET for ch in text)
