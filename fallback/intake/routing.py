"""Where each recipient of a message goes: the one routing decision, for SMTP and webmail alike.

* A fallback mailbox: provisioned here, and its mailstore is failed over
  (the failover scope covers it).  The user reads it in the webmail.
* The forward queue: provisioned here, but its mailstore is healthy, so the
  mail goes on to the main system (fallback.queues.forward).
* The outbound queue: not provisioned here, a remote address
  (fallback.queues.outbound).  Only the webmail has such recipients: the
  receiver refuses them at RCPT (never an open relay).

`decide` is the rule itself, a pure function of each recipient's mailstore
and one read of the scope; `route` and `route_async` read the directory and
the scope cache first.

A recipient that is not a mailbox (an alias, a subaddress, a catch-all,
postmaster@: intake/addressing.py) is a Resolution, and `plan` sends what it
reaches so that every real mailbox gets the message exactly once:

* its mailboxes of failed-over mailstores: a local copy, each mailbox once
  per message however many recipients name it;
* its mailboxes of healthy mailstores: forwarded as the mailbox's own
  address, each once (a subaddress of one: forwarded as given, tag kept);
* its outside addresses: when it reaches no mailbox here at all, the
  recipient itself is forwarded as addressed, and the main MTA expands it as
  it always does; otherwise each outside target is forwarded, once (the
  alias itself would have the main MTA deliver to the local ones again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from fallback.errors import AliasLoop, InputError
from fallback.intake import addressing
from fallback.intake.addressing import Policy, Resolution
from fallback.mailbox import directory
from fallback.mailbox.delivery import Delivery
from fallback.ops.failover import Scope, ScopeCache


@dataclass(frozen=True)
class Routes:
    """One message's recipients by route, each list in the order the recipients were given."""

    mailboxes: list[Delivery]  # into the fallback mailbox's INBOX
    forward: list[str]
    outbound: list[str]


def decide(mailstores: Mapping[str, str | None], scope: Scope, quota: int = 0) -> Routes:
    """Each recipient -> its mailstore (None: not provisioned here), judged against one scope.
    `quota`: what each fallback mailbox may hold with the message (the receiver's; 0: none)."""
    mailboxes: list[Delivery] = []
    forward: list[str] = []
    outbound: list[str] = []
    for address, mailstore in mailstores.items():
        if mailstore is None:
            outbound.append(address)
        elif scope.covers(mailstore):
            mailboxes.append(Delivery(address, mailstore, quota=quota))
        else:
            forward.append(address)
    return Routes(mailboxes, forward, outbound)


def plan(mailstores: Mapping[str, str | None], resolved: Iterable[Resolution], scope: Scope,
         quota: int = 0) -> Routes:
    """`decide` for the recipients that are mailboxes, then the others' reach (see above), each
    mailbox and each forwarded address once per message."""
    routes = decide(mailstores, scope, quota)
    local = {d.address for d in routes.mailboxes}
    forwarded = dict.fromkeys(routes.forward)
    for res in resolved:
        here = [m for m in res.mailboxes if scope.covers(m.mailstore)]
        if not here:
            # Nothing of it is kept here: the main system gets the address as it was given and
            # expands it itself (forwarding its healthy mailboxes and outside targets one by
            # one as well would give them a second copy when the main MTA has the same alias).
            forwarded.setdefault(res.address)
            continue
        for m in here:
            if m.address not in local:
                local.add(m.address)
                routes.mailboxes.append(Delivery(m.address, m.mailstore, quota=quota))
        for m in res.mailboxes:
            if not scope.covers(m.mailstore):
                forwarded.setdefault(res.address if res.how == addressing.SUBADDRESS else m.address)
        for outside in res.outside:
            forwarded.setdefault(outside)
    return Routes(routes.mailboxes, list(forwarded), routes.outbound)


def mailstores(d: directory.Directory, recipients: list[str]) -> dict[str, str | None]:
    """Each recipient's mailstore from the directory (one HMGET per bucket), None if not provisioned."""
    return {address: None if value is None else directory.Mailbox.decode(address, value).mailstore
            for address, value in zip(recipients, d.get_many(recipients), strict=True)}


def route(d: directory.Directory, scopes: ScopeCache, recipients: list[str],
          policy: Policy | None = None) -> Routes:
    """The webmail's question: each recipient's address resolution (the receiver's at RCPT: an
    alias wins over a mailbox of its address; a mailbox without alias is one round trip), then
    the (cached) scope.  Recipients that resolve to nothing here go out (outbound).
    InputError: a recipient's alias loops."""
    found: dict[str, str | None] = {}
    resolved: list[Resolution] = []
    policy = policy or Policy()
    for address in dict.fromkeys(recipients):
        try:
            res = addressing.resolve(d.r, d.buckets, address, policy)
        except AliasLoop as exc:
            raise InputError(exc.reason, public=(
                f"Mail to {address} cannot be delivered now: that address is an alias that "
                "loops. Nothing was sent; please tell your mail administrator.")) from None
        if res is None or res.how == addressing.EXACT:
            found[address] = res.mailboxes[0].mailstore if res is not None else None
        else:
            resolved.append(res)
    return plan(found, resolved, scopes.get(d.r))


async def mailstores_async(r: aioredis.Redis, buckets: int,
                           recipients: list[str]) -> dict[str, str | None]:
    found = await asyncio.gather(*(directory.lookup_async(r, buckets, a) for a in recipients))
    return {address: None if mailbox is None else mailbox.mailstore
            for address, mailbox in zip(recipients, found, strict=True)}


async def route_async(r: aioredis.Redis, buckets: int, scopes: ScopeCache,
                      recipients: list[str]) -> Routes:
    """The same from async code.  (The receiver has looked its recipients up at RCPT already,
    so at DATA it reads only the scope and calls `decide`.)"""
    return decide(await mailstores_async(r, buckets, recipients), await scopes.get_async(r))
