"""What a recipient address reaches: the one address resolution, for SMTP and the webmail alike.

The order is Postfix's (virtual_alias_maps, then recipient_delimiter):

1. a provisioned mailbox of exactly this address;
2. an alias of exactly this address, expanded through other aliases;
3. the address without its subaddress (`alice+news@x` -> `alice@x`, the
   delimiter being `recipient_delimiter`): a mailbox, else an alias;
4. postmaster@ and abuse@ of a served domain (RFC 5321 4.5.1): to
   `postmaster_address` when it is set;
5. the domain's catch-all alias (`@x`);
6. postmaster@ and abuse@ without any of the above: handed on as addressed
   to the main system (the forward queue), which has them.

Anything else is None: an unknown user (550 5.1.1) or not our domain.

An alias target is resolved by the same steps 1-3 and 5: a mailbox here, or
an outside address (anything the directory does not hold).  A chain deeper
than MAX_DEPTH or one that names an alias again is AliasLoop (451: the
sender retries while the operator fixes it; import refuses loops too).

The steps are written once, as a generator that yields each lookup it needs
(`_steps`); `resolve` (sync: the webmail) and `resolve_async` (the receiver)
only answer them.  The common case, a mailbox, is one HGET as before: the
alias buckets are read only for addresses that are not mailboxes.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import keys
from fallback.addresses import normalize_address
from fallback.config import Settings
from fallback.errors import AliasLoop
from fallback.mailbox import aliases, directory
from fallback.mailbox.directory import Mailbox

MAX_DEPTH = 8  # nested aliases; Postfix's virtual_alias_recursion_limit is 1000, real chains are short
ROLE_ACCOUNTS = ("postmaster", "abuse")

# What the steps ask: (kind, key) -> Mailbox | None, targets | None, or bool.
MAILBOX, ALIAS, DOMAIN = "mailbox", "alias", "domain"

# How an address was resolved (kept in the Resolution: the mail log and the docs name them).
EXACT, VIA_ALIAS, SUBADDRESS, CATCH_ALL, POSTMASTER = (
    "mailbox", "alias", "subaddress", "catch-all", "postmaster")


@dataclass(frozen=True)
class Policy:
    """The settings resolution depends on."""

    delimiter: str = "+"
    postmaster: str | None = None

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        pm = settings.postmaster_address
        return cls(settings.recipient_delimiter, normalize_address(pm) if pm else None)


@dataclass(frozen=True)
class Resolution:
    """One recipient's reach: the mailboxes here it names (each once) and the outside addresses."""

    address: str
    how: str
    mailboxes: tuple[Mailbox, ...] = ()
    outside: tuple[str, ...] = ()


def base_address(address: str, delimiter: str) -> str | None:
    """`alice+news@x` -> `alice@x` (the first delimiter character found splits); None without one."""
    if not delimiter:
        return None
    local, _, domain = address.rpartition("@")
    cut = min((i for i in (local.find(c) for c in delimiter) if i > 0), default=-1)
    return None if cut < 0 else f"{local[:cut]}@{domain}"


Steps = Generator[tuple[str, str], Any, Resolution | None]


def _steps(address: str, policy: Policy) -> Steps:
    local, _, domain = address.rpartition("@")
    mailbox = yield MAILBOX, address
    if mailbox is not None:
        return Resolution(address, EXACT, (mailbox,))
    found = yield from _named(address, policy, 0, ())
    if found is not None:
        return found
    role = local in ROLE_ACCOUNTS
    served = None
    if role:
        served = yield DOMAIN, domain
        if served and policy.postmaster and policy.postmaster != address:
            boxes, outside = yield from _targets((policy.postmaster,), policy, 1, (address,))
            return Resolution(address, POSTMASTER, boxes, outside)
    catch_all = yield ALIAS, "@" + domain
    if catch_all is not None:
        boxes, outside = yield from _targets(catch_all, policy, 1, ("@" + domain,))
        return Resolution(address, CATCH_ALL, boxes, outside)
    if role and served:
        return Resolution(address, POSTMASTER, (), (address,))
    return None


def _named(address: str, policy: Policy, depth: int, path: tuple[str, ...]) -> Generator[
        tuple[str, str], Any, Resolution | None]:
    """Steps 2 and 3 (the mailbox of exactly `address` is asked by the caller)."""
    targets = yield ALIAS, address
    if targets is not None:
        boxes, outside = yield from _targets(targets, policy, depth + 1, (*path, address))
        return Resolution(address, VIA_ALIAS, boxes, outside)
    base = base_address(address, policy.delimiter)
    if base is None:
        return None
    mailbox = yield MAILBOX, base
    if mailbox is not None:
        return Resolution(address, SUBADDRESS, (mailbox,))
    targets = yield ALIAS, base
    if targets is not None:
        boxes, outside = yield from _targets(targets, policy, depth + 1, (*path, base))
        return Resolution(address, SUBADDRESS, boxes, outside)
    return None


def _targets(targets: tuple[str, ...], policy: Policy, depth: int, path: tuple[str, ...]) -> Generator[
        tuple[str, str], Any, tuple[tuple[Mailbox, ...], tuple[str, ...]]]:
    """An alias's targets, expanded: (mailboxes here, each once; outside addresses, each once)."""
    if depth > MAX_DEPTH:
        raise AliasLoop(f"alias chain {' -> '.join(path)} is deeper than {MAX_DEPTH}")
    boxes: dict[str, Mailbox] = {}
    outside: dict[str, None] = {}
    for target in targets:
        if target in path:
            raise AliasLoop(f"alias loop: {' -> '.join((*path, target))}")
        mailbox = yield MAILBOX, target
        if mailbox is not None:
            boxes.setdefault(mailbox.address, mailbox)
            continue
        found = yield from _named(target, policy, depth, path)
        catch = "@" + target.rpartition("@")[2]
        if found is None and catch not in path:
            catch_all = yield ALIAS, catch
            if catch_all is not None:
                sub_boxes, sub_out = yield from _targets(catch_all, policy, depth + 1, (*path, catch))
                found = Resolution(target, CATCH_ALL, sub_boxes, sub_out)
        if found is None:
            outside.setdefault(target)  # not ours: the main MTA knows what to do with it
            continue
        for m in found.mailboxes:
            boxes.setdefault(m.address, m)
        for o in found.outside:
            outside.setdefault(o)
    return tuple(boxes.values()), tuple(outside)


def resolve(r: redis.Redis, buckets: int, address: str, policy: Policy) -> Resolution | None:
    """The webmail's resolution (sync Redis).  Raises AliasLoop; Redis errors pass through."""
    steps = _steps(address, policy)
    answer: Any = None
    try:
        while True:
            kind, key = steps.send(answer)
            if kind == MAILBOX:
                value = r.hget(keys.dir_bucket(key, buckets), key)
                answer = None if value is None else Mailbox.decode(key, value)
            elif kind == ALIAS:
                answer = aliases.lookup(r, buckets, key)
            else:
                answer = bool(r.hexists(keys.DIR_DOMAINS, key)
                              or r.hexists(keys.ALIAS_DOMAINS, key))
    except StopIteration as done:
        return done.value


async def resolve_async(r: aioredis.Redis, buckets: int, address: str,
                        policy: Policy) -> Resolution | None:
    """The receiver's resolution (async Redis): the same steps, answered with awaits."""
    steps = _steps(address, policy)
    answer: Any = None
    try:
        while True:
            kind, key = steps.send(answer)
            if kind == MAILBOX:
                answer = await directory.lookup_async(r, buckets, key)
            elif kind == ALIAS:
                answer = await aliases.lookup_async(r, buckets, key)
            else:
                answer = (await directory.domain_known_async(r, key)
                          or await aliases.domain_known_async(r, key))
    except StopIteration as done:
        return done.value


class ResolutionCache:
    """Resolved addresses that are not mailboxes (those are in directory.LookupCache), reused for
    a few seconds by one receiver process: hits only, bounded, like LookupCache."""

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.entries: dict[str, tuple[float, Resolution]] = {}

    def get(self, address: str, now: float) -> Resolution | None:
        hit = self.entries.get(address)
        return None if hit is None or hit[0] < now else hit[1]

    def put(self, resolution: Resolution, now: float) -> None:
        if self.ttl <= 0:
            return
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[resolution.address] = (now + self.ttl, resolution)
