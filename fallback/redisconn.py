"""Making Redis clients from the configuration.

One place decides which Redis a process talks to: the configured URL, or the
embedded redis-server that `fallback up` started in the same data dir.
Timeouts are short on purpose: during trouble the receiver must answer 4xx
quickly, not hang the sender.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

from fallback import embedded
from fallback.config import Settings, redact_url
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


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **_CLIENT_OPTIONS)


def async_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, **_CLIENT_OPTIONS)


def connect(settings: Settings) -> redis.Redis:
    """A sync client that has answered PING, or a StorageError saying where it failed."""
    url = resolve_url(settings)
    client = sync_client(url)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StorageError(f"Redis at {redact_url(url)} does not answer: {exc}") from None
    return client
