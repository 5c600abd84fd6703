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
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

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


def mailstores(d: directory.Directory, recipients: list[str]) -> dict[str, str | None]:
    """Each recipient's mailstore from the directory (one HMGET per bucket), None if not provisioned."""
    return {address: None if value is None else directory.Mailbox.decode(address, value).mailstore
            for address, value in zip(recipients, d.get_many(recipients), strict=True)}


def route(d: directory.Directory, scopes: ScopeCache, recipients: list[str]) -> Routes:
    """The webmail's question: the directory, then the (cached) scope."""
    return decide(mailstores(d, recipients), scopes.get(d.r))


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
