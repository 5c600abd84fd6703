"""Live SMTP connections: how many there are, in total and per client prefix, for the 421 caps,
the stress-dependent idle timeout, and shutdown.

The connections themselves are smtpd_adapter.FallbackSMTP; this module sees only what `Conn`
names, so it needs nothing of aiosmtpd.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Protocol

from fallback.intake.clientlimits import STRESS_SHARE, Client, ClientLimits

__all__ = ["Conn", "ConnectionTracker"]


class Conn(Protocol):
    """What the tracker and shutdown need of a connection."""

    @property
    def busy(self) -> bool: ...

    def rearm(self) -> None: ...

    def close_with(self, reply: bytes) -> None: ...


class ConnectionTracker:
    """Counts live connections, in total and per client prefix (clientlimits: the /32 and its
    /24, or the /64), for the 421 caps, the stress-dependent idle timeout, and shutdown."""

    def __init__(self, total: int, limits: ClientLimits) -> None:
        self.total = total
        self.limits = limits
        self.by_prefix: Counter[str] = Counter()
        self.connections: set[Conn] = set()
        self.shutting_down = False
        self.stress_at = max(1, math.ceil(total * STRESS_SHARE))
        self._rearmed_at = -math.inf

    @property
    def stressed(self) -> bool:
        return len(self.connections) >= self.stress_at

    @property
    def idle_timeout(self) -> float:
        """Postfix's stress-dependent behaviour: near the total cap, idle clients get a short
        time, so that slow or silent ones cannot keep the slots from senders with mail."""
        return self.limits.stress_idle_timeout if self.stressed else self.limits.idle_timeout

    def admit(self, conn: Conn, client: Client) -> bool:
        if self.shutting_down or len(self.connections) >= self.total:
            return False
        if not client.trusted:
            allowed = client.allowances(self.limits.connections_per_client)
            if any(self.by_prefix[p] >= n for p, n in zip(client.prefixes, allowed, strict=True)):
                return False
            self.by_prefix.update(client.prefixes)
        calm = not self.stressed
        self.connections.add(conn)
        if calm and self.stressed:
            self._stress_begins(conn)
        return True

    def _stress_begins(self, conn: Conn) -> None:
        """The shorter idle time holds for the connections already in, too.  At most once per
        stress_idle_timeout: a count that hovers at the threshold must not cost a pass over
        every connection per new one (those let in meanwhile wait one stress timeout more)."""
        now = time.monotonic()
        if now - self._rearmed_at < self.limits.stress_idle_timeout:
            return
        self._rearmed_at = now
        for other in self.connections:
            if other is not conn:  # conn's own timer starts once aiosmtpd has set it up
                other.rearm()

    def release(self, conn: Conn, client: Client) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            if not client.trusted:
                self.by_prefix.subtract(client.prefixes)
                for p in client.prefixes:
                    if self.by_prefix[p] <= 0:
                        del self.by_prefix[p]
