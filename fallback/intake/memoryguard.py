"""The receiver's memory guard: no new mail once Redis is past the memory reserve.

Past `memory_reserve` (a share of maxmemory, or a size) the receiver answers
`452 4.3.1` to MAIL FROM, so that the room left above it (up to maxmemory,
where Redis refuses writes) stays for what the webmail needs: logins,
sessions, flag changes and sending.  INFO memory is read at most once per
`interval` per receiver process, never per command; on a Redis Cluster every
primary is read and the fullest decides, since the first node to fill up
refuses the writes of its slots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from fallback.config.limits import memory_reserve_bytes
from fallback.errors import InsufficientStorage
from fallback.redisconn import is_cluster

log = logging.getLogger(__name__)


async def primary_infos_async(r: aioredis.Redis, section: str) -> list[dict[str, Any]]:
    """INFO `section` of every primary: one on a single Redis, each node's on a cluster
    (the async twin of fallback.ops.health.primary_infos)."""
    if not is_cluster(r):
        return [dict(await r.info(section))]
    reply: Any = await r.info(section, target_nodes="primaries")
    if reply and all(isinstance(v, dict) for v in reply.values()):
        return [dict(v) for v in reply.values()]
    return [dict(reply)]  # a cluster of one primary answers like a single server


@dataclass(frozen=True)
class NodeMemory:
    used: int
    reserve: int | None  # None: no limit to take a share of (maxmemory 0 and a percentage)

    @property
    def past(self) -> bool:
        return self.reserve is not None and self.used >= self.reserve


class MemoryGuard:
    """`refusal()`: the error to answer new mail with while Redis is past the reserve, else None."""

    def __init__(self, r: aioredis.Redis, reserve: str, interval: float = 1.0) -> None:
        self.r = r
        self.reserve = reserve
        self.interval = interval
        self.checked = float("-inf")
        self.fullest: NodeMemory | None = None

    async def refusal(self) -> InsufficientStorage | None:
        now = time.monotonic()
        if now - self.checked >= self.interval:
            self.checked = now  # callers arriving during the read use the last answer
            await self._read()
        node = self.fullest
        if node is None or not node.past:
            return None
        return InsufficientStorage(f"Redis used_memory {node.used} bytes is at or past the memory "
                                   f"reserve of {node.reserve} bytes (memory_reserve {self.reserve})")

    async def _read(self) -> None:
        try:
            infos = await primary_infos_async(self.r, "memory")
        except Exception as exc:
            # Not this guard's call: a Redis that does not answer fails the write itself (451).
            log.warning("memory guard: INFO memory failed: %r", exc)
            self.fullest = None
            return
        nodes = [NodeMemory(int(i.get("used_memory", 0)),
                            memory_reserve_bytes(self.reserve, int(i.get("maxmemory", 0))))
                 for i in infos]
        past = [n for n in nodes if n.past]
        self.fullest = past[0] if past else (nodes[0] if nodes else None)
