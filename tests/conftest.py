"""Shared fixtures: a real redis-server per session, the receiver on a free port, CLI runs.

Point the whole suite at another Redis with FALLBACK_TEST_REDIS_URL (any URL
the service takes: redis://, redis+cluster://, redis+sentinel://), or set
FALLBACK_TEST_REDIS=cluster to have a real 3-primary Redis Cluster started
for the session (`make test-cluster`).  Otherwise one durable redis-server
is started for the session.  Either way it is flushed before each test.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import eventloop
from fallback.config import Settings, load_settings
from fallback.intake.receiver import ReceiverServer
from fallback.mailbox import directory, passwords
from fallback.redisconn import async_client, sync_client
from tests.dovecot import dovecot, dovecot_factory  # noqa: F401 - fixtures
from tests.servers import RedisClusterServers, RedisServer, free_port
from tests.slapd import slapd_factory  # noqa: F401 - fixture


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("FALLBACK_TEST_REDIS_URL")
    if external:
        yield external
        return
    if os.environ.get("FALLBACK_TEST_REDIS") == "cluster":
        cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
        yield cluster.url
        cluster.stop()
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = sync_client(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(r: redis.Redis, redis_url: str, tmp_path: Path) -> Settings:
    return load_settings({"redis_url": redis_url, "data_dir": str(tmp_path / "data"),
                          "hostname": "fallback.test", "smtp_port": 0,
                          # Sent at once, as before issue 15; tests/test_undo_send.py turns it on.
                          "undo_send_seconds": 0}, env={})


@functools.lru_cache(maxsize=64)
def cached_hash(password: str, scheme: str) -> str:
    """Hashing is slow on purpose; tests reuse one hash per (password, scheme)."""
    return passwords.hash_password(password, scheme)


def add_mailbox(r: redis.Redis, settings: Settings, address: str, password: str = "secret",
                mailstore: str = "default", scheme: str = "SHA512-CRYPT") -> None:
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    d.put(directory.Mailbox(address, mailstore, cached_hash(password, scheme)))


@pytest.fixture
def mailboxes(r: redis.Redis, settings: Settings) -> list[str]:
    addrs = ["alice@example.com", "bob@example.com", "carol@example.org"]
    for a in addrs:
        add_mailbox(r, settings, a)
    return addrs


class ReceiverThread:
    """The real receiver on its own event loop in a thread, on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = eventloop.new_event_loop(settings)  # the product's loop: uvloop by default
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ReceiverServer | None = None
        self.port = 0

    def start(self) -> ReceiverThread:
        self.thread.start()
        self.port = self.call(self._start())
        return self

    async def _start(self) -> int:
        r = async_client(self.settings.redis_url or "")
        buckets = await directory.ensure_buckets_async(r, self.settings.directory_buckets)
        self.server = ReceiverServer(self.settings, r, buckets)
        return await self.server.start()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace=5))
            self.call(self.server.handler.r.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def receiver_factory(settings: Settings) -> Iterator[Any]:
    started: list[ReceiverThread] = []

    def make(**overrides: Any) -> ReceiverThread:
        s = replace(settings, **overrides) if overrides else settings
        rt = ReceiverThread(s).start()
        started.append(rt)
        return rt

    yield make
    for rt in started:
        rt.stop()


@pytest.fixture
def receiver(receiver_factory: Any, mailboxes: list[str]) -> ReceiverThread:
    return receiver_factory()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def web_app(settings: Settings, r: redis.Redis, mailboxes: list[str]) -> Any:
    """The webmail (create_app) on the test Redis, with alice, bob and carol provisioned."""
    from tests.webutil import make_app

    return make_app(settings, r)


@pytest.fixture
def client(web_app: Any) -> Any:
    return web_app.test_client()
