"""What a recipient address reaches: the one address resolution, for SMTP and the webmail alike.

The order is Postfix's: virtual_alias_maps apply to every recipient,
mailboxes included, and with recipient_delimiter the alias lookups
(`alice+news@x`, then `alice@x`) come before the mailbox lookups:

1. an alias of exactly this address, expanded (an alias wins over a
   mailbox of the same address: `bob@x  manager@x` redirects a departed
   user, `alice@x  alice@x, alice@elsewhere` keeps a copy and forwards one);
2. an alias of the address without its subaddress (`alice+news@x` ->
   `alice@x`, the delimiter being `recipient_delimiter`);
3. a provisioned mailbox of exactly this address;
4. the mailbox of the address without its subaddress;
5. postmaster@ and abuse@ of a served domain (RFC 5321 4.5.1): to
   `postmaster_address` when it is set;
6. the domain's catch-all alias (`@x`);
7. postmaster@ and abuse@ without any of the above: handed on as addressed
   to the main system (the forward queue), which has them.

Anything else is None: an unknown user (550 5.1.1) or not our domain.

An alias target is resolved by the same steps 1-4 and 6: a mailbox here, or
an outside address (anything the directory does not hold).  As in Postfix
("a virtual alias that maps to itself stops the recursion"), an alias
already expanded on the way is not expanded again: its address is then the
mailbox of that address, or, when the alias names itself, an outside
address (the main system's).  Reached again through other aliases without
a mailbox (a -> b -> a) it is AliasLoop, as is a chain deeper than
MAX_DEPTH (451: the sender retries while the operator fixes it; import
refuses both too, virtualfile.check_chains).

The steps are written once, as a generator that yields each batch of
lookups it needs (`_steps`); `resolve` (sync: the webmail) and
`resolve_async` (the receiver) answer each batch with one non-transactional
pipeline.  The common case, a mailbox without alias, is one round trip of
two HGETs (its directory bucket and its alias bucket; four with a
subaddress).
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
from fallback.mailbox.aliases import Alias
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


Ask = tuple[str, str]
Steps = Generator[list[Ask], list[Any], Resolution | None]


def _steps(address: str, policy: Policy) -> Steps:
    local, _, domain = address.rpartition("@")
    found = yield from _reach(address, policy, 0, ())
    if found is not None:
        return found
    role = local in ROLE_ACCOUNTS
    served = None
    if role:
        (served,) = yield [(DOMAIN, domain)]
        if served and policy.postmaster and policy.postmaster != address:
            boxes, outside = yield from _targets((policy.postmaster,), policy, 1, (address,))
            return Resolution(address, POSTMASTER, boxes, outside)
    (catch_all,) = yield [(ALIAS, "@" + domain)]
    if catch_all is not None:
        boxes, outside = yield from _targets(catch_all, policy, 1, ("@" + domain,))
        return Resolution(address, CATCH_ALL, boxes, outside)
    if role and served:
        return Resolution(address, POSTMASTER, (), (address,))
    return None


def _reach(address: str, policy: Policy, depth: int, path: tuple[str, ...]) -> Generator[
        list[Ask], list[Any], Resolution | None]:
    """Steps 1-4 for `address` (a recipient, or a target reached through the aliases in `path`):
    every lookup they may need is asked at once, so a mailbox without alias is one round trip."""
    base = base_address(address, policy.delimiter)
    names = (address,) if base is None else (address, base)
    answers = yield [(ALIAS, n) for n in names] + [(MAILBOX, n) for n in names]
    again = None
    for name, targets in zip(names, answers[:len(names)], strict=True):
        if targets is None:
            continue
        if name in path:  # expanded already: as Postfix's, the recursion stops at this address
            again = again or name
            continue
        boxes, outside = yield from _targets(targets, policy, depth + 1, (*path, name))
        return Resolution(address, VIA_ALIAS if name == address else SUBADDRESS, boxes, outside)
    for name, mailbox in zip(names, answers[len(names):], strict=True):
        if mailbox is not None:
            return Resolution(address, EXACT if name == address else SUBADDRESS, (mailbox,))
    if again is None:
        return None
    if again != path[-1]:  # a -> b -> a with no mailbox a: nothing would ever take the mail
        raise AliasLoop(f"alias loop: {' -> '.join((*path, address))}")
    return Resolution(address, VIA_ALIAS, (), (address,))  # names itself: the main system's


def _targets(targets: tuple[str, ...], policy: Policy, depth: int, path: tuple[str, ...]) -> Generator[
        list[Ask], list[Any], tuple[tuple[Mailbox, ...], tuple[str, ...]]]:
    """An alias's targets, expanded: (mailboxes here, each once; outside addresses, each once)."""
    if depth > MAX_DEPTH:
        raise AliasLoop(f"alias chain {' -> '.join(path)} is deeper than {MAX_DEPTH}")
    boxes: dict[str, Mailbox] = {}
    outside: dict[str, None] = {}
    for target in targets:
        found = yield from _reach(target, policy, depth, path)
        catch = "@" + target.rpartition("@")[2]
        if found is None and catch not in path:
            (catch_all,) = yield [(ALIAS, catch)]
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


def _queue(pipe: Any, asks: list[Ask], buckets: int) -> None:
    """The asks as commands of one non-transactional pipeline (keys of any slots: cluster-safe)."""
    for kind, key in asks:
        if kind == MAILBOX:
            pipe.hget(keys.dir_bucket(key, buckets), key)
        elif kind == ALIAS:
            pipe.hget(keys.alias_bucket(key, buckets), key)
        else:
            pipe.hexists(keys.DIR_DOMAINS, key)
            pipe.hexists(keys.ALIAS_DOMAINS, key)


def _answers(asks: list[Ask], raw: list[Any]) -> list[Any]:
    values = iter(raw)
    answers: list[Any] = []
    for kind, key in asks:
        value = next(values)
        if kind == MAILBOX:
            answers.append(None if value is None else Mailbox.decode(key, value))
        elif kind == ALIAS:
            answers.append(None if value is None else Alias.decode(key, value).targets)
        else:
            answers.append(bool(value) or bool(next(values)))
    return answers


def resolve(r: redis.Redis, buckets: int, address: str, policy: Policy) -> Resolution | None:
    """The webmail's resolution (sync Redis).  Raises AliasLoop; Redis errors pass through."""
    steps = _steps(address, policy)
    try:
        asks = next(steps)
        while True:
            pipe = r.pipeline(transaction=False)
            _queue(pipe, asks, buckets)
            asks = steps.send(_answers(asks, pipe.execute()))
    except StopIteration as done:
        return done.value


async def resolve_async(r: aioredis.Redis, buckets: int, address: str,
                        policy: Policy) -> Resolution | None:
    """The receiver's resolution (async Redis): the same steps, one pipeline per batch of asks."""
    steps = _steps(address, policy)
    try:
        asks = next(steps)
        while True:
            pipe = r.pipeline(transaction=False)
            _queue(pipe, asks, buckets)
            asks = steps.send(_answers(asks, await pipe.execute()))
    except StopIteration as done:
        return done.value
