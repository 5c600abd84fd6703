"""Dovecot-style password hashes: recognise, verify, and hash plain text.

Stored form is Dovecot's `{SCHEME}hash` (with Dovecot's optional `.HEX` / `.B64`
encoding suffix, e.g. `{SHA256.HEX}`), so the hashes the main store already has work
unchanged.  Every check goes through the hashing library (libpass, imported as passlib);
this module only undoes Dovecot's encodings.  Verification is deliberately slow (that is
the point of these schemes): callers on an event loop or a request path run it in a thread.

Plain text is hashed only where it is marked as such: `{PLAIN}` / `{CLEARTEXT}`
(Dovecot's names), or a CSV password without a prefix (the CSV format says so),
and never when it has the exact shape of a crypt hash that lost its prefix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from typing import Any

from passlib.context import CryptContext
from passlib.hash import (
    argon2,
    bcrypt,
    des_crypt,
    hex_md5,
    hex_sha1,
    hex_sha256,
    hex_sha512,
    ldap_salted_md5,
    ldap_salted_sha1,
    ldap_salted_sha256,
    ldap_salted_sha512,
    md5_crypt,
    pbkdf2_sha1,
    sha256_crypt,
    sha512_crypt,
)
from passlib.utils.binary import ab64_encode

from fallback.errors import ConfigError, InputError

# Schemes whose stored text is a crypt(3)-style string, verified by one passlib handler.
# Dovecot's {CRYPT} is whatever the system's crypt(3) verifies: DES, BSDi, $1$ MD5, $5$,
# $6$ and bcrypt (doveadm's own {CRYPT} hashes are bcrypt); the context tries each.
_CRYPT3 = CryptContext(schemes=["sha512_crypt", "sha256_crypt", "bcrypt", "md5_crypt",
                                "bsdi_crypt", "des_crypt"])
_TEXT: dict[str, Any] = {
    "SHA512-CRYPT": sha512_crypt,
    "SHA256-CRYPT": sha256_crypt,
    "BLF-CRYPT": bcrypt,
    "ARGON2ID": argon2,
    "ARGON2I": argon2,
    "MD5-CRYPT": md5_crypt,
    "DES-CRYPT": des_crypt,
    "CRYPT": _CRYPT3,
}
# Unsalted digests: passlib's hex_* handlers verify the hex form of the raw digest.
_UNSALTED: dict[str, Any] = {
    "SHA512": hex_sha512, "SHA256": hex_sha256, "SHA": hex_sha1, "SHA1": hex_sha1,
    "PLAIN-MD5": hex_md5, "LDAP-MD5": hex_md5,
}
# Salted digests, `digest(password + salt) + salt`: passlib's LDAP handlers take salts of
# 4-16 bytes (Dovecot and slappasswd write 4); other lengths, which Dovecot also verifies,
# fall back to the same one-shot hashlib digest passlib computes.
_SALTED: dict[str, tuple[Any, Any]] = {
    "SSHA512": (ldap_salted_sha512, hashlib.sha512), "SSHA256": (ldap_salted_sha256, hashlib.sha256),
    "SSHA": (ldap_salted_sha1, hashlib.sha1), "SMD5": (ldap_salted_md5, hashlib.md5),
}
_PASSLIB_SALT = range(4, 17)
# Dovecot's own PBKDF2 (HMAC-SHA1, 20-byte key): `$1$salt$rounds$hexkey`.
_PBKDF2_RE = re.compile(r"\$1\$([^$]+)\$([1-9][0-9]{0,8})\$([0-9A-Fa-f]{40})")
_KNOWN = (*_TEXT, "PBKDF2", *_SALTED, *_UNSALTED)
# Dovecot's names for plain text: CLEARTEXT is PLAIN (split_scheme spells both PLAIN).
_PLAIN_ALIASES = ("PLAIN", "CLEARTEXT")
SCHEMES = (*_KNOWN, "PLAIN")
# Dovecot's encoding suffixes ({SCHEME.HEX}); without one the scheme's default applies.
_ENCODINGS = {"HEX": "hex", "B64": "b64", "BASE64": "b64"}

_SCHEME_RE = re.compile(r"^\{([A-Za-z0-9._-]+)\}(.*)$", re.DOTALL)
# The exact shape of each crypt-style hash.  Import checks every line with these
# (passlib's identify only looks at the prefix, and its full parse is slower).
_B64 = "[./0-9A-Za-z]"
_ARGON2_PARAMS = r"(?:v=\d+\$)?m=\d+,t=\d+,p=\d+(?:,[a-z]+=[^$]*)*\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
_SHAPES = {
    "SHA512-CRYPT": re.compile(rf"\$6\$(?:rounds=\d{{1,9}}\$)?[^$:\s]{{0,16}}\${_B64}{{86}}"),
    "SHA256-CRYPT": re.compile(rf"\$5\$(?:rounds=\d{{1,9}}\$)?[^$:\s]{{0,16}}\${_B64}{{43}}"),
    "BLF-CRYPT": re.compile(rf"\$2[abxy]?\$\d\d\${_B64}{{53}}"),
    "ARGON2ID": re.compile(r"\$argon2id\$" + _ARGON2_PARAMS),
    "ARGON2I": re.compile(r"\$argon2i\$" + _ARGON2_PARAMS),
    "MD5-CRYPT": re.compile(rf"\$1\$[^$:\s]{{0,8}}\${_B64}{{22}}"),
    "PBKDF2": _PBKDF2_RE,
}
# Not in looks_like: a 13-character password has the shape of a DES hash.
_DES_SHAPE = re.compile(rf"{_B64}{{13}}")
_BSDI_SHAPE = re.compile(rf"_{_B64}{{19}}")


def split_scheme(stored: str) -> tuple[str | None, str]:
    """`{SHA512-CRYPT}$6$...` -> ("SHA512-CRYPT", "$6$..."); no prefix -> (None, text)."""
    m = _SCHEME_RE.match(stored)
    if not m:
        return None, stored
    scheme = m.group(1).upper()
    return ("PLAIN" if scheme in _PLAIN_ALIASES else scheme), m.group(2)


def _parse(scheme: str) -> tuple[str, str | None] | None:
    """"SHA256.HEX" -> ("SHA256", "hex"); None for a scheme or encoding we do not know."""
    base, dot, suffix = scheme.partition(".")
    if base not in _KNOWN or (dot and suffix not in _ENCODINGS):
        return None
    return base, (_ENCODINGS[suffix] if dot else None)


def check_scheme_name(setting: str, name: str) -> str:
    """A scheme named in the settings (default_scheme), upper case; ConfigError when it is not
    one this service can verify."""
    scheme = name.strip().strip("{}").upper()
    if scheme in _PLAIN_ALIASES:
        return "PLAIN"
    if _parse(scheme) is None:
        raise ConfigError(f"{setting}: unknown password scheme {name!r} "
                          f"(known: {', '.join((*_KNOWN, *_PLAIN_ALIASES))})")
    return scheme


def looks_like(text: str) -> str | None:
    """The crypt scheme whose exact shape `text` has ($6$..., $2y$..., $argon2id$...), if any."""
    for scheme, shape in _SHAPES.items():
        if shape.fullmatch(text):
            return scheme
    return None


def plain_text(password: str) -> str:
    """The plain text of a password field to hash ({PLAIN}/{CLEARTEXT} or no prefix); refuses an
    empty one, and one that is really a crypt hash without its {SCHEME} prefix."""
    scheme, body = split_scheme(password)
    if not body:
        raise InputError("empty password")
    shape = looks_like(body) if scheme is None else None
    if shape is not None:
        raise InputError(f"the password looks like a {shape} hash without its {{SCHEME}} prefix; "
                         f"write {{{shape}}} before the hash (or {{PLAIN}} before the text, if that "
                         "really is the password)")
    return body


def hash_password(plain: str, scheme: str = "ARGON2ID") -> str:
    scheme = scheme.upper()
    if scheme == "ARGON2ID":
        return "{ARGON2ID}" + argon2.using(type="ID", parallelism=1).hash(plain)
    if scheme == "ARGON2I":
        return "{ARGON2I}" + argon2.using(type="I", parallelism=1).hash(plain)
    if scheme == "BLF-CRYPT":
        return "{BLF-CRYPT}" + bcrypt.using(ident="2y").hash(plain)
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        return "{" + scheme + "}" + _TEXT[scheme].hash(plain)
    raise InputError(f"cannot hash with scheme {scheme}")


def _decode(scheme: str, base: str, encoding: str | None, body: str) -> str | bytes:
    """The hash as the library reads it: text for crypt-style schemes, raw bytes for digests
    (Dovecot's rules: base64 by default; for a fixed-size digest without a suffix, hex when
    the length says so).  InputError when the encoding is broken."""
    if encoding is None:
        if base in _UNSALTED:
            # hex_* handlers' checksum_size counts hex digits: twice the raw digest.
            encoding = "hex" if len(body) == _UNSALTED[base].checksum_size else "b64"
        elif base in _SALTED:
            encoding = "b64"
        else:
            return body  # crypt-style text: the common case, kept short for big imports
    try:
        raw = binascii.unhexlify(body) if encoding == "hex" else base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        name = "hex" if encoding == "hex" else "base64"
        raise InputError(f"malformed {{{scheme}}} hash (not {name})") from None
    if base in _TEXT or base == "PBKDF2":
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise InputError(f"malformed {{{scheme}}} hash") from None
    return raw


def _checked(stored: str) -> tuple[str, str, str, str | bytes]:
    """(scheme as written, hash as written, base scheme, decoded hash) of a stored
    `{SCHEME}hash`, validated in full; InputError naming what is wrong."""
    scheme, body = split_scheme(stored)
    if scheme is None:
        raise InputError("password hash has no {SCHEME} prefix")
    if scheme == "PLAIN":
        raise InputError("{PLAIN} must be hashed, not stored")
    parsed = _parse(scheme)
    if parsed is None:
        raise InputError(f"unknown password scheme {{{scheme}}} (known: {', '.join(SCHEMES)})")
    base, encoding = parsed
    value = _decode(scheme, base, encoding, body)
    if isinstance(value, bytes):
        size = (_UNSALTED[base].checksum_size // 2 if base in _UNSALTED
                else _SALTED[base][0].checksum_size)
        if base in _UNSALTED and len(value) != size:
            raise InputError(f"malformed {{{scheme}}} hash ({len(value)} bytes, not {size})")
        if base in _SALTED and len(value) <= size:
            raise InputError(f"malformed {{{scheme}}} hash (no salt)")
    elif not _text_shape_ok(base, value):
        raise InputError(f"malformed {{{scheme}}} hash")
    return scheme, body, base, value


def _text_shape_ok(base: str, text: str) -> bool:
    shape = _SHAPES.get(base)
    if shape is not None:
        return bool(shape.fullmatch(text))
    if base == "DES-CRYPT":
        return bool(_DES_SHAPE.fullmatch(text))
    if base == "CRYPT":
        return (any(_SHAPES[s].fullmatch(text)
                    for s in ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "MD5-CRYPT"))
                or bool(_DES_SHAPE.fullmatch(text) or _BSDI_SHAPE.fullmatch(text)))
    return False


def check_stored(stored: str) -> str:
    """Validate a `{SCHEME}hash` for import; returns it normalised, raises InputError."""
    scheme, body, _, _ = _checked(stored)
    return "{" + scheme + "}" + body


def prepare_for_import(password: str, scheme_for_plain: str) -> str:
    """The directory's stored form of a provisioning password field."""
    if not password:
        raise InputError("empty password")
    scheme, _ = split_scheme(password)
    if scheme in (None, "PLAIN"):
        return hash_password(plain_text(password), scheme_for_plain)
    return check_stored(password)


def _verify_salted(base: str, plain: str, raw: bytes) -> bool:
    handler, algo = _SALTED[base]
    size = handler.checksum_size
    if len(raw) - size in _PASSLIB_SALT:
        return bool(handler.verify(plain, handler.ident + base64.b64encode(raw).decode()))
    return hmac.compare_digest(algo(plain.encode() + raw[size:]).digest(), raw[:size])


def _verify_pbkdf2(plain: str, text: str) -> bool:
    m = _PBKDF2_RE.fullmatch(text)
    if m is None:
        return False
    salt, rounds, key = m.groups()
    # The same computation in passlib's own notation (salt and key in its adapted base64).
    as_passlib = (f"$pbkdf2${rounds}${ab64_encode(salt.encode()).decode()}"
                  f"${ab64_encode(bytes.fromhex(key)).decode()}")
    return bool(pbkdf2_sha1.verify(plain, as_passlib))


def verify_password(plain: str, stored: str) -> bool:
    """True when `plain` matches; False for a mismatch or an unusable hash.  Slow."""
    try:
        _, _, base, value = _checked(stored)
        if isinstance(value, bytes):
            if base in _UNSALTED:
                return bool(_UNSALTED[base].verify(plain, value.hex()))
            return _verify_salted(base, plain, value)
        if base == "PBKDF2":
            return _verify_pbkdf2(plain, value)
        return bool(_TEXT[base].verify(plain, value))
    except (InputError, ValueError, TypeError):
        return False


def dummy_hash(scheme: str = "ARGON2ID") -> str:
    """A hash to verify against for unknown users, so they cost what real ones cost."""
    return hash_password("not-a-password-of-anyone", scheme)
