"""The compact, lossless binary form of a stored `{SCHEME}hash` in a directory record.

A bcrypt hash is 71 characters as Dovecot writes it and 40 bytes here; that keeps
a whole directory record under Redis' default `hash-max-listpack-value 64`, so
the buckets stay listpack-encoded on a stock server (docs/performance.md, "Issue
17: provisioning into a stock Redis").  `unpack(pack(s)) == s` for every string:
a form is used only where it reproduces the text exactly (bcrypt's canonical last
characters, checked by its pattern; the tail form's round trip, checked), else
the text itself is kept, so verification always sees the hash as it was imported.

Forms (the first byte says which; each is self-delimiting, so a record may carry
more after it):
  0  text:   2-byte length, the UTF-8 text
  0x80 | v << 5 | cost  bcrypt: `{BLF-CRYPT}$2<v>$<cost>$` + 22 + 31 characters of
             bcrypt's base64 (v: a, b, x, y as 0-3; cost 0-31) -> 16 salt, 23 digest bytes
  2  tail:   the text up to its last `$` (or `}`) as it is, then the last segment,
             characters of crypt's alphabet (`./0-9A-Za-z`), 3 bytes per 4
  3  tail in the standard base64 alphabet (`+/`, argon2's), same layout
"""

from __future__ import annotations

import binascii
import re

_STD = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_CRYPT = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BCRYPT_TO_STD = bytes.maketrans(_BCRYPT, _STD)
_STD_TO_BCRYPT = bytes.maketrans(_STD, _BCRYPT)
_CRYPT_TO_STD = bytes.maketrans(_CRYPT, _STD)
_STD_TO_CRYPT = bytes.maketrans(_STD, _CRYPT)

# Only the canonical last characters (bcrypt writes its spare bits as zeros): 22 characters
# carry 132 bits for 128 of salt (last one of ".Oeu"), 31 carry 186 for 184 of digest (last
# one a multiple of 4 in bcrypt's alphabet), so every match packs and unpacks exactly.
# As bytes too, for a reader that matches whole lines (provision's _FAST_ROW) and then packs
# with pack_bcrypt_matched, without matching again (issue 17).
BCRYPT_PATTERN = (rb"\{BLF-CRYPT\}\$2[abxy]\$(?:[0-2][0-9]|3[01])\$"
                  rb"[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}[.CGKOSWaeimquy26]")
_BCRYPT_RE = re.compile(BCRYPT_PATTERN.decode())
_TAIL_RE = re.compile(r"(.*[$}])([./A-Za-z0-9]{4,255})", re.DOTALL)
_STD_TAIL_RE = re.compile(r"(.*[$}])([+/A-Za-z0-9]{4,255})", re.DOTALL)
TEXT, TAIL, STD_TAIL, BCRYPT = 0, 2, 3, 0x80
_VARIANTS = b"abxy"
_BCRYPT_SIZE = 1 + 16 + 23


def _b64_pack(chars: bytes) -> bytes:
    """Standard-alphabet base64 characters, padded with "A" to whole groups: 3 bytes per 4."""
    return binascii.a2b_base64(chars + b"A" * (-len(chars) % 4))


def _b64_unpack(raw: bytes, n: int) -> bytes:
    return binascii.b2a_base64(raw, newline=False)[:n]


def _pack_bcrypt(stored: str) -> bytes | None:
    if _BCRYPT_RE.fullmatch(stored) is None:
        return None
    return pack_bcrypt_matched(stored.encode("ascii"))


def pack_bcrypt_matched(text: bytes) -> bytes:
    """pack() of a hash known to match BCRYPT_PATTERN whole (the caller matched it)."""
    # {BLF-CRYPT}$2y$10$ + 22 salt + 31 digest characters
    chars = text[18:].translate(_BCRYPT_TO_STD)
    form = BCRYPT | _VARIANTS.index(text[13]) << 5 | (text[15] - 48) * 10 + text[16] - 48
    return (bytes((form,))
            + binascii.a2b_base64(chars[:22] + b"==") + binascii.a2b_base64(chars[22:] + b"="))


def pack_bcrypt_many(texts: list[bytes]) -> list[bytes]:
    """pack_bcrypt_matched of each (a fresh import's block of lines): one translate for all,
    the variant-and-cost byte looked up once per kind (issue 17)."""
    chars = b"".join([t[18:] for t in texts]).translate(_BCRYPT_TO_STD)  # 53 characters each
    a2b = binascii.a2b_base64
    forms: dict[bytes, bytes] = {}
    out = []
    for k, t in zip(range(0, 53 * len(texts), 53), texts, strict=True):
        form = forms.get(kind := t[13:17])  # b"y$10"
        if form is None:
            form = forms[kind] = pack_bcrypt_matched(t)[:1]
        out.append(form + a2b(chars[k:k + 22] + b"==") + a2b(chars[k + 22:k + 53] + b"="))
    return out


def _unpack_bcrypt(raw: bytes, at: int) -> tuple[str, int]:
    b2a = binascii.b2a_base64
    form = raw[at]
    text = (b"{BLF-CRYPT}$2%c$%02d$" % (_VARIANTS[form >> 5 & 3], form & 31)
            + (b2a(raw[at + 1:at + 17], newline=False)[:22]
               + b2a(raw[at + 17:at + _BCRYPT_SIZE], newline=False)[:31]).translate(_STD_TO_BCRYPT))
    return text.decode("ascii"), at + _BCRYPT_SIZE


def _pack_tail(stored: str) -> bytes | None:
    for form, shape, table in ((TAIL, _TAIL_RE, _CRYPT_TO_STD), (STD_TAIL, _STD_TAIL_RE, None)):
        m = shape.fullmatch(stored)
        if m is None:
            continue
        head = m.group(1).encode()
        tail = m.group(2).encode()
        if len(head) > 255:
            return None
        chars = tail.translate(table) if table is not None else tail
        return bytes((form, len(head))) + head + bytes((len(tail),)) + _b64_pack(chars)
    return None


def _unpack_tail(raw: bytes, at: int) -> tuple[str, int]:
    form, head_len = raw[at], raw[at + 1]
    at += 2
    head = raw[at:at + head_len]
    at += head_len
    n = raw[at]
    size = (n + 3) // 4 * 3
    chars = _b64_unpack(raw[at + 1:at + 1 + size], n)
    if form == TAIL:
        chars = chars.translate(_STD_TO_CRYPT)
    return (head + chars).decode("utf-8"), at + 1 + size


def _pack_text(stored: str) -> bytes:
    data = stored.encode("utf-8")
    return bytes((TEXT,)) + len(data).to_bytes(2, "big") + data


def pack(stored: str) -> bytes:
    """The binary form of `stored` (any string under 64 KiB), reproduced exactly by `unpack`."""
    if stored.startswith("{BLF-CRYPT}"):
        packed = _pack_bcrypt(stored)
        if packed is not None:
            return packed  # exact by construction (_BCRYPT_RE): the hot path of an import
    text = _pack_text(stored)
    packed = _pack_tail(stored)
    # The tail form is a bijection too; checked all the same, off the hot path.
    if packed is not None and len(packed) < len(text) and unpack(packed)[0] == stored:
        return packed
    return text


def unpack(raw: bytes, at: int = 0) -> tuple[str, int]:
    """(the hash text, the offset just past its form) of the form starting at `at`."""
    form = raw[at]
    if form & BCRYPT:
        return _unpack_bcrypt(raw, at)
    if form in (TAIL, STD_TAIL):
        return _unpack_tail(raw, at)
    if form == TEXT:
        n = int.from_bytes(raw[at + 1:at + 3], "big")
        return raw[at + 3:at + 3 + n].decode("utf-8"), at + 3 + n
    raise ValueError(f"unknown password hash form {form}")
