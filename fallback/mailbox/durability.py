"""Replica acknowledgement for the 250 rule: WAIT (or WAITAOF) after a durable write.

With `replica_acks = N` the receiver answers 250 only once N replicas hold the
write as well (WAITAOF: have it in their AOF on disk, Redis 7.2 and later;
WAIT: have received it, older servers).  WAIT counts what was written on the
connection it is sent on, so it always travels in the same pipeline as the
writes it covers, on the same connection (on a Redis Cluster: one per node
the batch touched).  Too few confirmations within replica_ack_timeout is a
storage failure: 451, and the sender retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot

from fallback.config import Settings
from fallback.errors import StorageError
from fallback.redisconn import is_cluster

WAITAOF_SINCE = (7, 2)


@dataclass(frozen=True)
class ReplicaAcks:
    replicas: int
    timeout_ms: int
    waitaof: bool           # the server has WAITAOF
    cluster: Any = None     # the async RedisCluster client, to route WAIT to each written node

    @classmethod
    async def for_settings(cls, r: aioredis.Redis, settings: Settings) -> ReplicaAcks | None:
        if settings.replica_acks <= 0:
            return None
        info: Any = await r.info("server")
        if is_cluster(r):  # one INFO per node; they run the same version in any sane cluster
            info = next(iter(info.values())) if "redis_version" not in info else info
        version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
        return cls(settings.replica_acks, int(settings.replica_ack_timeout * 1000),
                   version >= WAITAOF_SINCE, r if is_cluster(r) else None)

    def command(self) -> tuple[Any, ...]:
        if self.waitaof:
            return ("WAITAOF", 0, self.replicas, self.timeout_ms)
        return ("WAIT", self.replicas, self.timeout_ms)

    def queue_wait(self, pipe: Any, written_keys: list[str]) -> int:
        """Queue WAIT after the writes on `pipe`; returns how many replies it adds."""
        if self.cluster is None:
            pipe.execute_command(*self.command())
            return 1
        nodes = {}
        for key in written_keys:
            node = self.cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))
            nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command(*self.command(), target_nodes=node)
        return len(nodes)

    def shortfall(self, replies: list[Any]) -> StorageError | None:
        """The error for the writes when any WAIT came back short (or failed)."""
        for reply in replies:
            if isinstance(reply, BaseException):
                return StorageError(f"replica acknowledgement failed: {reply}")
            got = int(reply[1] if isinstance(reply, list | tuple) else reply)
            if got < self.replicas:
                return StorageError(f"only {got} of {self.replicas} replica(s) confirmed the write "
                                    f"within {self.timeout_ms} ms")
        return None
