"""Reseller tokens of the admin API: made, listed, revoked, and checked on each request.

A reseller token lets its holder ask the admin API about some domains only
(`GET /admin/api/affected` and `/admin/api/status`); the admin token
(admin_token) still sees everything.  Only the token's SHA-256 is stored:
the token is 32 random bytes (256 bits), so nobody can guess it or find it
from its hash by trying candidates, and a slow password hash (which exists
to protect low-entropy passwords) would only make every API call slower.
The lookup is by hash (one HGET) and the stored hash is then compared with
`hmac.compare_digest`, so the time taken does not depend on how much of a
guess was right.

Keys (one hash tag, so a token's records change in one slot on a Cluster):
keys.RESELLERS (name -> JSON), keys.RESELLER_DIGESTS (hash -> name),
keys.RESELLER_REVOKED (hash of a revoked token -> JSON, so a revoked
token is told apart from a wrong one) and keys.RESELLER_USED (name ->
last use).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from fallback import keys
from fallback.addresses import normalize_address
from fallback.errors import InputError

PREFIX = "fbr_"  # says what a leaked string is (secret scanners match on it)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# KEYS: tokens, digests; ARGV: name, JSON record, digest.  0: the name is taken.
_CREATE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
# KEYS: tokens, digests, revoked, used; ARGV: name, revoked at.  Returns the record or false.
_REVOKE = """
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then return false end
local digest = cjson.decode(rec)['digest']
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], digest)
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[3], digest, cjson.encode({name = ARGV[1], revoked = tonumber(ARGV[2])}))
return rec
"""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_domain(text: str) -> str:
    """A domain as the directory keys it (lower case, IDNA); InputError naming the bad one."""
    name = text.strip().rstrip(".")
    bad = InputError(f"--domain: not a domain name: {text!r}")
    if not name or "@" in name or "." not in name:
        raise bad
    try:
        return normalize_address(f"x@{name}").partition("@")[2]
    except InputError:
        raise bad from None


def check_name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise InputError(f"--name: {text!r} is not a token name (letters, digits, . _ -; at most 64)")
    return text


@dataclass(frozen=True)
class Token:
    """What is stored about one reseller token (never the token itself)."""

    name: str
    domains: tuple[str, ...]
    created: float
    expires: float | None
    creator: str
    digest: str
    last_used: float | None = None

    def as_json(self) -> str:
        return json.dumps({"domains": list(self.domains), "created": self.created,
                           "expires": self.expires, "creator": self.creator, "digest": self.digest})

    @classmethod
    def parse(cls, name: str, raw: Any, last_used: Any = None) -> Token:
        f = json.loads(raw)
        return cls(name, tuple(f["domains"]), float(f["created"]),
                   None if f.get("expires") is None else float(f["expires"]), str(f.get("creator", "")),
                   str(f["digest"]), None if last_used is None else float(last_used))

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


@dataclass(frozen=True)
class Principal:
    """Who is asking the admin API: the admin (domains None: everything) or a reseller token."""

    name: str
    domains: frozenset[str] | None

    @property
    def is_admin(self) -> bool:
        return self.domains is None

    def sees(self, domain: str) -> bool:
        return self.domains is None or domain in self.domains


ADMIN = Principal("admin", None)


@dataclass(frozen=True)
class Refused:
    """Why a presented token was refused: reason is the metric label, text what the caller reads."""

    reason: str   # wrong | expired | revoked
    text: str


def create(r: redis.Redis, domains: Iterable[str], name: str | None, expires_in: float | None,
           creator: str, now: float | None = None) -> tuple[str, Token]:
    """A new token and its stored record; InputError if the name is taken or a domain is bad."""
    wanted = sorted({check_domain(d) for d in domains})
    if not wanted:
        raise InputError("give at least one --domain")
    if expires_in is not None and expires_in <= 0:
        raise InputError("--expires must be greater than 0")
    now = time.time() if now is None else now
    token = PREFIX + secrets.token_urlsafe(32)
    name = check_name(name) if name is not None else f"{wanted[0]}-{secrets.token_hex(3)}"
    rec = Token(name, tuple(wanted), now, None if expires_in is None else now + expires_in, creator,
                digest(token))
    if not int(r.eval(_CREATE, 2, keys.RESELLERS, keys.RESELLER_DIGESTS, name, rec.as_json(),
                      rec.digest)):
        raise InputError(f"a token named {name!r} exists already (fallback token list)")
    return token, rec


def listing(r: redis.Redis) -> list[Token]:
    """Every live token, by name (expired ones too: they are still revocable)."""
    with r.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.RESELLERS)
        pipe.hgetall(keys.RESELLER_USED)
        records, used = pipe.execute()
    used_by = {k.decode(): v for k, v in used.items()}
    return sorted((Token.parse(k.decode(), v, used_by.get(k.decode())) for k, v in records.items()),
                  key=lambda t: t.name)


def revoke(r: redis.Redis, name: str, now: float | None = None) -> Token:
    now = time.time() if now is None else now
    raw: Any = r.eval(_REVOKE, 4, keys.RESELLERS, keys.RESELLER_DIGESTS, keys.RESELLER_REVOKED,
                      keys.RESELLER_USED, name, repr(now))
    if not raw:
        raise InputError(f"no token named {name!r} (fallback token list)")
    return Token.parse(name, raw)


def authenticate(r: redis.Redis, given: str, admin_token: str | None,
                 now: float | None = None) -> Principal | Refused:
    """The admin token, or a live reseller token: who it is; otherwise why it is refused."""
    now = time.time() if now is None else now
    wanted = digest(given)
    if admin_token is not None and hmac.compare_digest(wanted, digest(admin_token)):
        return ADMIN
    name: Any = r.hget(keys.RESELLER_DIGESTS, wanted)
    raw: Any = r.hget(keys.RESELLERS, name) if name is not None else None
    if raw is not None:
        tok = Token.parse(name.decode(), raw)
        if hmac.compare_digest(tok.digest, wanted):
            if tok.expired(now):
                return Refused("expired", "token expired")
            r.hset(keys.RESELLER_USED, tok.name, repr(now))
            return Principal(tok.name, frozenset(tok.domains))
    if r.hexists(keys.RESELLER_REVOKED, wanted):
        return Refused("revoked", "token revoked")
    return Refused("wrong", "wrong token")
