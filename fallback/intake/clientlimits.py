"""Per-client limits of the SMTP receiver: who a client is (its address prefixes), who is
exempt (the trusted relays), and the per-prefix message rate, counted in Redis.

A client is counted at every prefix it could move within.  An IPv4 client counts at its
/32 and its /24; the /24 gets NETWORK_FACTOR times the /32's allowance, so a NAT or a small
sending farm is not one host, yet a spammer who owns a /24 is not 256 clients.  An IPv6
client counts at its /64 only: one subscriber gets a whole /64 and can pick any address in
it.  IPv4-mapped IPv6 (::ffff:a.b.c.d, what a dual-stack socket reports) counts as IPv4.
Trusted relays (the perimeter MTAs, `trusted_relays`) carry everyone's mail and are exempt
from every per-client limit, though not from the total connection cap.

The message rate is counted in Redis, so every receiver process sharing the port (and
every machine sharing the Redis) counts against the same allowance, per minute, with the
minute before weighted by how much of it still lies inside the last sixty seconds (a
sliding window, so a burst across a minute boundary is not let through twice).  A message
counts once its DATA is in; MAIL FROM is refused with 451 4.7.1 when the client has sent
its allowance (ClientLimits says how, at no round trip per message).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fallback import keys
from fallback.config import Settings
from fallback.config.limits import Network, parse_networks

__all__ = ["NETWORK_FACTOR", "STRESS_SHARE", "Client", "ClientLimits", "prefixes"]

log = logging.getLogger(__name__)

# An IPv4 /24 may do this many times what one of its addresses may (connections, messages).
NETWORK_FACTOR = 4
# Share of max_connections in use from which the receiver is "under stress" (Postfix's
# term) and gives idle clients stress_idle_timeout instead of idle_timeout.
STRESS_SHARE = 0.8
WINDOW = 60.0  # seconds: the message rate is per minute


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def prefixes(ip: str) -> tuple[str, ...]:
    """The prefixes a client is counted at, narrowest first: ("203.0.113.7/32",
    "203.0.113.0/24") for IPv4 (mapped or not), ("2001:db8:1:2::/64",) for IPv6.  Anything
    that is not an IP address (a Unix socket peer) is its own single prefix."""
    addr = _address(ip)
    if addr is None:
        return (ip,)
    if addr.version == 4:
        return (f"{addr}/32", str(ipaddress.ip_network((int(addr), 24), strict=False)))
    # int() drops a scope id (fe80::1%eth0), which is not part of the network.
    return (str(ipaddress.IPv6Network((int(addr), 64), strict=False)),)


@dataclass(frozen=True)
class Client:
    """One SMTP client as the limits see it."""

    ip: str
    prefixes: tuple[str, ...]
    trusted: bool = False

    def allowances(self, base: int) -> tuple[int, ...]:
        """`base` for the narrowest prefix, NETWORK_FACTOR times it for the /24."""
        return tuple(base if i == 0 else base * NETWORK_FACTOR for i in range(len(self.prefixes)))


class ClientLimits:
    """The per-client settings of one receiver process, and the message rate counted in Redis.

    Counting costs the receiver no round trip per message: each process adds up its
    messages per prefix and adds them to Redis every FLUSH_INTERVAL in one pipeline
    (INCRBY, PEXPIRE and a GET of the minute before), whose replies tell it what every
    process together has counted.  MAIL FROM is judged on that; only a prefix this process
    has not heard of lately is looked up first (two GETs), so a client over its allowance
    that moves to another process or machine is refused there at once.  A client sending
    through several processes at the same moment may pass its allowance by what they let
    through in one FLUSH_INTERVAL before each hears of the others."""

    FLUSH_INTERVAL = 0.5  # each flush is a Redis write, so an fsync with appendfsync always
    # Prefixes remembered at most (a few tens of MB); past it those of earlier minutes go,
    # and if that is not enough all (they are read from Redis again when they come back).
    MAX_SEEN = 100_000

    def __init__(self, settings: Settings, r: aioredis.Redis | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.trusted: tuple[Network, ...] = parse_networks(settings.trusted_relays)
        self.connections_per_client = settings.max_connections_per_ip
        self.messages_per_minute = settings.max_messages_per_ip_per_minute
        self.idle_timeout = settings.idle_timeout
        self.stress_idle_timeout = min(settings.stress_idle_timeout, settings.idle_timeout)
        self.min_data_rate = settings.min_data_rate
        self.r = r
        self.clock = clock
        # A client's allowance at each of its prefixes (IPv6 has only the first).
        self._allowed = (self.messages_per_minute, self.messages_per_minute * NETWORK_FACTOR)
        # prefix -> [minute, its count, the count of the minute before]: what Redis last said,
        # plus what this process counted since.
        self._seen: dict[str, list[int]] = {}
        # (prefix, minute) -> messages counted here and not yet added in Redis.
        self._pending: dict[tuple[str, int], int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._pruned = 0
        self._failing = False
        self._clients: dict[str, Client] = {}  # ip -> who it is (client())

    # Clients remembered at most by client(); past it all go (they are worked out again).
    MAX_CLIENTS = 10_000

    def client(self, ip: str) -> Client:
        """Who `ip` is.  Remembered: parsing the address and its prefixes each time cost a
        few per cent of the receiver's time where every message is a new connection."""
        known = self._clients.get(ip)
        if known is not None:
            return known
        addr = _address(ip)
        trusted = addr is not None and any(addr in net for net in self.trusted)
        if len(self._clients) >= self.MAX_CLIENTS:
            self._clients.clear()
        found = self._clients[ip] = Client(ip, prefixes(ip), trusted)
        return found

    def _counted(self, client: Client) -> bool:
        return not client.trusted and self.messages_per_minute > 0 and self.r is not None

    async def over_message_rate(self, client: Client) -> str | None:
        """The prefix of `client` that has sent its allowance of messages in the last minute
        (one more would be over it), or None to go ahead.

        When Redis cannot answer, the process judges by what it counted itself: the durable
        write at DATA meets the same trouble and answers 4xx anyway, and a limit must not
        turn a Redis hiccup into refusals of its own."""
        if not self._counted(client):
            return None
        minute, earlier = self._window()
        unheard = [p for p in client.prefixes if p not in self._seen]
        if unheard:
            assert self.r is not None
            pipe = self.r.pipeline(transaction=False)
            for prefix in unheard:
                pipe.get(keys.smtp_rate(prefix, minute))
                pipe.get(keys.smtp_rate(prefix, minute - 1))
            got = await self._run(pipe, client.ip)
            if got is not None:
                for i, prefix in enumerate(unheard):
                    if prefix not in self._seen:  # else counted meanwhile: that is newer
                        self._seen[prefix] = [minute, int(got[2 * i] or 0), int(got[2 * i + 1] or 0)]
        return self._over(client, minute, earlier)

    def count_message(self, client: Client) -> None:
        """One more message from `client` (its DATA is in): counted here at once, in Redis
        within FLUSH_INTERVAL."""
        if not self._counted(client):
            return
        minute = self._window()[0]
        pending, seen_of = self._pending, self._seen
        for prefix in client.prefixes:
            key = (prefix, minute)
            pending[key] = pending.get(key, 0) + 1
            seen = seen_of.get(prefix)
            if seen is None:
                seen_of[prefix] = [minute, 1, 0]
            else:
                if seen[0] != minute:
                    self._roll(seen, minute)
                seen[1] += 1
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(self.FLUSH_INTERVAL)
            await self.flush()
        finally:
            self._flusher = None

    async def aclose(self) -> None:
        """At shutdown: what was counted here goes to Redis now."""
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()

    async def flush(self) -> None:
        """Add what was counted here to Redis, and learn what all processes have counted.
        Never raises; on failure the counts wait for the next flush (if still in the window)."""
        if not self._pending or self.r is None:
            return
        taken, self._pending = self._pending, {}
        pipe = self.r.pipeline(transaction=False)
        for (prefix, minute), n in taken.items():
            key = keys.smtp_rate(prefix, minute)
            pipe.incrby(key, n)
            pipe.pexpire(key, int(2 * WINDOW * 1000))
            pipe.get(keys.smtp_rate(prefix, minute - 1))
        got = await self._run(pipe, "this receiver")
        now, _ = self._window()
        if got is None:
            for (prefix, minute), n in taken.items():
                if minute >= now - 1:
                    self._pending[(prefix, minute)] = self._pending.get((prefix, minute), 0) + n
            return
        for i, (prefix, minute) in enumerate(taken):
            if minute != now:
                continue
            # Redis' count, plus what was counted here while the pipeline was on its way.
            self._seen[prefix] = [minute, int(got[3 * i]) + self._pending.get((prefix, minute), 0),
                                  int(got[3 * i + 2] or 0)]

    def _window(self) -> tuple[int, float]:
        """This minute, and the share of the minute before that is still in the last 60 s."""
        minute, into = divmod(self.clock(), WINDOW)
        if int(minute) > self._pruned or len(self._seen) > self.MAX_SEEN:
            # Once a minute: forget clients not heard of in the last two.
            keep = int(minute) - (1 if int(minute) > self._pruned else 0)
            self._pruned = int(minute)
            self._seen = {p: v for p, v in self._seen.items() if v[0] >= keep}
            if len(self._seen) > self.MAX_SEEN:
                self._seen.clear()
        return int(minute), 1.0 - into / WINDOW

    @staticmethod
    def _roll(seen: list[int], minute: int) -> None:
        """Move a prefix's counts on to `minute`: this minute's count becomes the one before."""
        seen[:] = [minute, 0, seen[1] if seen[0] == minute - 1 else 0]

    def _over(self, client: Client, minute: int, earlier: float) -> str | None:
        for prefix, allowed in zip(client.prefixes, self._allowed):  # noqa: B905 - IPv6: one prefix
            seen = self._seen.get(prefix)
            if seen is None:
                continue
            if seen[0] != minute:
                self._roll(seen, minute)
            if seen[1] + seen[2] * earlier + 1 > allowed:
                return prefix
        return None

    async def _run(self, pipe: Any, who: str) -> list[Any] | None:
        try:
            got = list(await pipe.execute())
        except (TimeoutError, RedisError, OSError) as exc:
            if not self._failing:
                log.warning("message rate not counted (from %s on, until Redis answers): %r", who, exc)
            self._failing = True
            return None
        if self._failing:
            log.info("message rate counted again")
            self._failing = False
        return got
