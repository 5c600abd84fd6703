"""Dovecot-style password hashes: recognise, verify, and hash plain text.

Stored form is Dovecot's `{SCHEME}hash`, so the hashes the main store already
has work unchanged.  Verification is deliberately slow (that is the point of
these schemes): callers on an event loop or a request path run it in a thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from typing import Any

from passlib.hash import (
    argon2,
    bcrypt,
    ldap_salted_sha256,
    ldap_salted_sha512,
    sha256_crypt,
    sha512_crypt,
)

from fallback.errors import InputError

# Scheme name -> passlib handler.  SSHA* have a hashlib fallback (below) because
# passlib only takes salts of 4-16 bytes and Dovecot allows any length.
_HANDLERS: dict[str, Any] = {
    "SHA512-CRYPT": sha512_crypt,
    "SHA256-CRYPT": sha256_crypt,
    "BLF-CRYPT": bcrypt,
    "ARGON2ID": argon2,
    "ARGON2I": argon2,
    "SSHA512": ldap_salted_sha512,
    "SSHA256": ldap_salted_sha256,
}
_SSHA_DIGEST = {"SSHA512": (hashlib.sha512, 64), "SSHA256": (hashlib.sha256, 32)}
SCHEMES = (*_HANDLERS, "PLAIN")

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
}


def split_scheme(stored: str) -> tuple[str | None, str]:
    """`{SHA512-CRYPT}$6$...` -> ("SHA512-CRYPT", "$6$..."); no prefix -> (None, text)."""
    m = _SCHEME_RE.match(stored)
    if not m:
        return None, stored
    return m.group(1).upper(), m.group(2)


def hash_password(plain: str, scheme: str = "ARGON2ID") -> str:
    scheme = scheme.upper()
    if scheme == "ARGON2ID":
        return "{ARGON2ID}" + argon2.using(type="ID", parallelism=1).hash(plain)
    if scheme == "ARGON2I":
        return "{ARGON2I}" + argon2.using(type="I", parallelism=1).hash(plain)
    if scheme == "BLF-CRYPT":
        return "{BLF-CRYPT}" + bcrypt.using(ident="2y").hash(plain)
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        return "{" + scheme + "}" + _HANDLERS[scheme].hash(plain)
    raise InputError(f"cannot hash with scheme {scheme}")


def check_stored(stored: str) -> str:
    """Validate a `{SCHEME}hash` for import; returns it normalised, raises InputError."""
    scheme, body = split_scheme(stored)
    if scheme is None:
        raise InputError("password hash has no {SCHEME} prefix")
    if scheme == "PLAIN":
        raise InputError("{PLAIN} must be hashed, not stored")
    if scheme not in _HANDLERS:
        raise InputError(f"unknown password scheme {{{scheme}}} (known: {', '.join(SCHEMES)})")
    if scheme in _SSHA_DIGEST:
        _ssha_split(scheme, body)
    elif not _SHAPES[scheme].fullmatch(body):
        raise InputError(f"malformed {{{scheme}}} hash")
    return "{" + scheme + "}" + body


def prepare_for_import(password: str, scheme_for_plain: str) -> str:
    """The directory's stored form of a provisioning password field."""
    if not password:
        raise InputError("empty password")
    scheme, body = split_scheme(password)
    if scheme == "PLAIN":
        if not body:
            raise InputError("empty password")
        return hash_password(body, scheme_for_plain)
    if scheme is None:
        return hash_password(password, scheme_for_plain)
    return check_stored(password)


def _ssha_split(scheme: str, body: str) -> tuple[bytes, bytes]:
    _, size = _SSHA_DIGEST[scheme]
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"malformed {{{scheme}}} hash (not base64)") from None
    if len(raw) <= size:
        raise InputError(f"malformed {{{scheme}}} hash (no salt)")
    return raw[:size], raw[size:]


def verify_password(plain: str, stored: str) -> bool:
    """True when `plain` matches; False for a mismatch or an unusable hash.  Slow."""
    scheme, body = split_scheme(stored)
    if scheme is None or scheme not in _HANDLERS:
        return False
    if scheme in _SSHA_DIGEST:
        try:
            digest, salt = _ssha_split(scheme, body)
        except InputError:
            return False
        algo, _ = _SSHA_DIGEST[scheme]
        return hmac.compare_digest(algo(plain.encode() + salt).digest(), digest)
    try:
        return bool(_HANDLERS[scheme].verify(plain, body))
    except (ValueError, TypeError):
        return False


def dummy_hash(scheme: str = "ARGON2ID") -> str:
    """A hash to verify against for unknown users, so they cost what real ones cost."""
    return hash_password("not-a-password-of-anyone", scheme)
