"""Making Redis clients from the configuration.

One place decides which Redis a process talks to: the configured URL, or the
embedded redis-server that `fallback up` started in the same data dir.  Three
kinds of URL are understood:

- `redis://`, `rediss://`, `unix://`: one server (redis-py's own URL syntax);
- `redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`: a Redis Cluster,
  found through any of the seed nodes;
- `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[?sentinel_password=P]`:
  the current primary of SERVICE as the Sentinels report it, re-resolved
  after a failover.

Timeouts are short on purpose: during trouble the receiver must answer 4xx
quickly, not hang the sender.
"""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff

from fallback import embedded
from fallback.config import Settings
from fallback.config.redisurl import (
    Topology,
    parse_topology,
    redact_url,
)
from fallback.errors import ConfigError, StorageError

_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 3,
    "socket_timeout": 15,
    "health_check_interval": 30,
}
def resolve_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    url = embedded.find_url(settings.data_dir)
    if url is None:
        raise ConfigError(
            f"no Redis: give --redis-url (or FALLBACK_REDIS_URL), or start `fallback up` "
            f"with --data-dir {settings.data_dir}"
        )
    return url


def _auth(t: Topology) -> dict[str, Any]:
    return {"username": t.username, "password": t.password}


def sync_client(url: str) -> redis.Redis:
    """A client for any of the three URL kinds.

    A RedisCluster is handed out typed as redis.Redis: the project only uses the
    commands both offer, each touching one hash slot (see keys.py), and the few
    places where the two differ ask `is_cluster`.
    """
    t = parse_topology(url)
    if t is None:
        return redis.Redis.from_url(url, **_CLIENT_OPTIONS)
    if t.kind == "cluster":
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in t.nodes]
        return cast(redis.Redis, redis.cluster.RedisCluster(
            startup_nodes=nodes, **_auth(t), **_CLIENT_OPTIONS))
    # No retries towards a Sentinel: redis-py's default (10, backing off) spends seconds on each
    # one that is down before asking the next; they are a list so that one may be down.
    sentinel = redis.sentinel.Sentinel(
        t.nodes, sentinel_kwargs={"password": t.sentinel_password, "socket_connect_timeout": 3,
                                  "socket_timeout": 3, "retry": redis.retry.Retry(NoBackoff(), 0)},
        **_auth(t), **_CLIENT_OPTIONS)
    return sentinel.master_for(t.service)


def async_client(url: str) -> aioredis.Redis:
    t = parse_topology(url)
    if t is None:
        return aioredis.Redis.from_url(url, **_CLIENT_OPTIONS)
    if t.kind == "cluster":
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in t.nodes]
        return cast(aioredis.Redis, redis.asyncio.cluster.RedisCluster(
            startup_nodes=nodes, **_auth(t), **_CLIENT_OPTIONS))
    sentinel = redis.asyncio.sentinel.Sentinel(
        t.nodes, sentinel_kwargs={"password": t.sentinel_password, "socket_connect_timeout": 3,
                                  "socket_timeout": 3, "retry": redis.asyncio.retry.Retry(NoBackoff(), 0)},
        **_auth(t), **_CLIENT_OPTIONS)
    return sentinel.master_for(t.service)


def is_cluster(r: Any) -> bool:
    """True for a Redis Cluster client: writes must then stay within one hash slot each."""
    return isinstance(r, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def connect(settings: Settings) -> redis.Redis:
    """A sync client that has answered PING, or a StorageError saying where it failed."""
    url = resolve_url(settings)
    client = sync_client(url)
    try:
        client.ping()
    except redis.sentinel.MasterNotFoundError:
        # redis-py's own text embeds each Sentinel client's repr: say what the Sentinels said.
        raise StorageError(_no_primary(url)) from None
    except (redis.RedisError, OSError) as exc:
        raise StorageError(f"Redis at {redact_url(url)} does not answer: {exc}") from None
    return client


def _no_primary(url: str) -> str:
    """Why the Sentinels of `url` named no primary, asked one by one."""
    t = parse_topology(url)
    assert t is not None and t.kind == "sentinel"
    said = []
    for host, port in t.nodes:
        c = redis.Redis(host, port, password=t.sentinel_password, socket_connect_timeout=3,
                        socket_timeout=3, retry=redis.retry.Retry(NoBackoff(), 0))
        try:
            found = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", t.service)
            said.append(f"{host}:{port} does not monitor {t.service!r}" if found is None
                        else f"{host}:{port} reports {t.service!r} down")
        except redis.AuthenticationError:
            said.append(f"{host}:{port} refuses the sentinel_password")
        except redis.ResponseError:
            said.append(f"{host}:{port} is not a Sentinel")
        except (redis.RedisError, OSError):
            said.append(f"no Sentinel answers at {host}:{port}")
        finally:
            c.close()
    return f"no primary for Sentinel service {t.service!r}: " + "; ".join(said)
