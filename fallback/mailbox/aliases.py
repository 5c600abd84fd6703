"""Aliases: addresses that are not mailboxes but name other addresses (Postfix virtual(5) entries).

Stored like the directory (directory.py), lean and cluster-ready: bucketed
small hashes `alias:{n}` (keys.alias_bucket, the directory's bucket count)
whose values are the targets joined by "," (no address can hold a comma), so
a lookup is one HGET and no command touches two buckets.  A catch-all for a
domain is the entry "@domain".  `alias:domains` counts the aliases of each
domain, so a domain served only by aliases is known to the receiver and
`count()` needs no walk over the buckets.

Each value starts with a one-letter tag of where the alias came from
("v|a@x,b@y": ORIGINS), so a sync of one source removes only the aliases
that source created: an LDAP `--sync` never removes a virtual file's or an
`alias add`, and the reverse.  The tag costs two bytes and no second key;
the lookup stays one HGET.  A value without a tag (stored before origins
existed) reads as a virtual file's.  Enumerating one origin's aliases walks
the buckets (entries()), as a sync already does.

This module stores and looks up one level; expanding chains (and refusing
loops at run time) is the receiver's address resolution, refusing them at
import time is virtualfile.py's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.addresses import normalize_address
from fallback.errors import InputError

_SEPARATOR = ","
_TAG = "|"
VIRTUAL, LDAP, MANUAL = "v", "l", "m"
ORIGINS = {VIRTUAL: "virtual file", LDAP: "LDAP", MANUAL: "alias add"}


def normalize_alias_address(text: str) -> str:
    """The canonical form of an alias address: a normalised address, or "@domain" (catch-all)."""
    stripped = text.strip().strip("<>").strip()
    if stripped.startswith("@"):
        try:
            return "@" + normalize_address("postmaster" + stripped).rpartition("@")[2]
        except InputError:
            raise InputError(f"not a domain for a catch-all: {text!r}") from None
    return normalize_address(stripped)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


@dataclass(frozen=True)
class Alias:
    address: str              # normalised, or "@domain" for a catch-all
    targets: tuple[str, ...]  # normalised addresses, in file order, without duplicates
    origin: str = VIRTUAL     # a key of ORIGINS: which source created it (and may remove it)

    def encode(self) -> str:
        return self.origin + _TAG + _SEPARATOR.join(self.targets)

    @classmethod
    def decode(cls, address: str, value: bytes | str) -> Alias:
        text = value.decode() if isinstance(value, bytes) else value
        origin = VIRTUAL
        if text[1:2] == _TAG and text[:1] in ORIGINS:
            origin, text = text[0], text[2:]
        return cls(address, tuple(text.split(_SEPARATOR)) if text else (), origin)

    @property
    def catch_all(self) -> bool:
        return self.address.startswith("@")


def make_alias(address: str, targets: list[str], origin: str = VIRTUAL) -> Alias:
    """An Alias from text as a person typed it: normalised, duplicates dropped (first kept)."""
    name = normalize_alias_address(address)
    for target in targets:
        if target.startswith("@"):
            raise InputError(f"target {target!r} rewrites a whole domain; give full addresses as targets")
    unique = tuple(dict.fromkeys(normalize_address(t) for t in targets))
    if not unique:
        raise InputError(f"alias {name} has no target")
    return Alias(name, unique, origin)


class Aliases:
    """Sync access for the CLI, provisioning and the webmail."""

    def __init__(self, r: redis.Redis, buckets: int) -> None:
        self.r = r
        self.buckets = buckets

    def get(self, address: str) -> Alias | None:
        value = self.r.hget(keys.alias_bucket(address, self.buckets), address)
        return None if value is None else Alias.decode(address, value)

    def get_many(self, addresses: list[str]) -> list[Alias | None]:
        """Stored aliases of many addresses: one HMGET per bucket, pipelined."""
        groups: dict[str, list[str]] = {}
        for address in addresses:
            groups.setdefault(keys.alias_bucket(address, self.buckets), []).append(address)
        pipe = self.r.pipeline(transaction=False)
        for bucket, members in groups.items():
            pipe.hmget(bucket, members)
        found: dict[str, Alias | None] = {}
        for members, values in zip(groups.values(), pipe.execute(), strict=True):
            for address, value in zip(members, values, strict=True):
                found[address] = None if value is None else Alias.decode(address, value)
        return [found[a] for a in addresses]

    def put_many(self, aliases: Iterable[Alias]) -> int:
        """Add or replace many aliases (one HSET per bucket, pipelined); returns how many were new."""
        batch = list({a.address: a for a in aliases}.values())
        if not batch:
            return 0
        olds = self.get_many([a.address for a in batch])
        records: dict[str, dict[Any, Any]] = {}
        domains: Counter[str] = Counter()
        for alias, old in zip(batch, olds, strict=True):
            bucket = keys.alias_bucket(alias.address, self.buckets)
            records.setdefault(bucket, {})[alias.address] = alias.encode()
            if old is None:
                domains[domain_of(alias.address)] += 1
        pipe = self.r.pipeline(transaction=False)
        for bucket, mapping in records.items():
            pipe.hset(bucket, mapping=mapping)
        for domain, n in domains.items():
            pipe.hincrby(keys.ALIAS_DOMAINS, domain, n)
        pipe.execute()
        return sum(domains.values())

    def put(self, alias: Alias) -> None:
        self.put_many([alias])

    def remove(self, address: str) -> bool:
        removed = int(self.r.hdel(keys.alias_bucket(address, self.buckets), address))
        if not removed:
            return False
        domain = domain_of(address)
        if int(self.r.hincrby(keys.ALIAS_DOMAINS, domain, -1)) <= 0:
            self.r.hdel(keys.ALIAS_DOMAINS, domain)
        return True

    def addresses(self, batch: int = 256) -> Iterator[str]:
        """Every alias address, bucket by bucket (pipelined HKEYS, no single hot key)."""
        for start in range(0, self.buckets, batch):
            pipe = self.r.pipeline(transaction=False)
            for n in range(start, min(start + batch, self.buckets)):
                pipe.hkeys(keys.alias_bucket_n(n))
            for names in pipe.execute():
                for name in names:
                    yield name.decode()

    def entries(self, origin: str | None = None, batch: int = 256) -> Iterator[Alias]:
        """Every stored alias (of one origin, when given), bucket by bucket (pipelined HGETALL)."""
        for start in range(0, self.buckets, batch):
            pipe = self.r.pipeline(transaction=False)
            for n in range(start, min(start + batch, self.buckets)):
                pipe.hgetall(keys.alias_bucket_n(n))
            for bucket in pipe.execute():
                for name, value in bucket.items():
                    alias = Alias.decode(name.decode(), value)
                    if origin is None or alias.origin == origin:
                        yield alias

    def domains(self) -> dict[str, int]:
        raw: dict[Any, Any] = self.r.hgetall(keys.ALIAS_DOMAINS)
        return {k.decode(): int(v) for k, v in raw.items()}

    def count(self) -> int:
        return sum(self.domains().values())


def lookup(r: redis.Redis, buckets: int, address: str) -> tuple[str, ...] | None:
    """The targets of exactly this address (normalised, or "@domain"); None when it is no alias."""
    value = r.hget(keys.alias_bucket(address, buckets), address)
    return None if value is None else Alias.decode(address, value).targets


async def lookup_async(r: aioredis.Redis, buckets: int, address: str) -> tuple[str, ...] | None:
    value = await r.hget(keys.alias_bucket(address, buckets), address)
    return None if value is None else Alias.decode(address, value).targets


async def domain_known_async(r: aioredis.Redis, domain: str) -> bool:
    """True when the domain has an alias (or a catch-all), even with no mailbox provisioned."""
    return bool(await r.hexists(keys.ALIAS_DOMAINS, domain))
