"""Dovecot-style password hashes: recognise, verify, and hash plain text.

Stored form is Dovecot's `{SCHEME}hash`, so the hashes the main store already
has work unchanged.  Verification is deliberately slow (that is the point of
these schemes): callers on an event loop or a request path run it in a thread.

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

from passlib.hash import (
    argon2,
    bcrypt,
    ldap_salted_sha256,
    ldap_salted_sha512,
    sha256_crypt,
    sha512_crypt,
)

from fallback.errors import ConfigError, InputError

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
# Dovecot's names for plain text: CLEARTEXT is PLAIN (split_scheme spells both PLAIN).
_PLAIN_ALIASES = ("PLAIN", "CLEARTEXT")

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
    scheme = m.group(1).upper()
    return ("PLAIN" if scheme in _PLAIN_ALIASES else scheme), m.group(2)


def check_scheme_name(setting: str, name: str) -> str:
    """A scheme named in the settings (default_scheme), upper case; ConfigError when it is not
    one this service can verify."""
    scheme = name.strip().strip("{}").upper()
    if scheme in _PLAIN_ALIASES:
        return "PLAIN"
    if scheme not in _HANDLERS:
        raise ConfigError(f"{setting}: unknown password scheme {name!r} "
                          f"(known: {', '.join((*_HANDLERS, *_PLAIN_ALIASES))})")
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
    scheme, _ = split_scheme(password)
    if scheme in (None, "PLAIN"):
        return hash_password(plain_text(password), scheme_for_plain)
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
