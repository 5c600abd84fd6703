"""Unique, time-ordered message ids (ULID layout: 48-bit ms time + 80 random bits, base32)."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I L O U


def new_id(now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | secrets.randbits(80)
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def id_time_ms(msg_id: str) -> int:
    # The first 10 characters are exactly the 48-bit millisecond time.
    value = 0
    for ch in msg_id[:10]:
        value = (value << 5) | _ALPHABET.index(ch)
    return value


def is_id(text: str) -> bool:
    return len(text) == 26 and all(ch in _ALPHABET for ch in text)
