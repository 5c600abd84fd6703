"""The receiver's memory guard against a real redis-server with maxmemory and noeviction:
past the reserve new mail gets 452 4.3.1 at MAIL FROM, while the webmail's writes (log-in,
session, flags, a Sent copy) still fit in the room above it; under it, mail flows again."""

from __future__ import annotations

import smtplib
import time
from typing import Any

import pytest
import redis

from fallback.mailbox import delivery, fields, store
from fallback.mailbox.store import MailboxReader
from tests.conftest import add_mailbox
from tests.servers import RedisServer
from tests.webutil import make_app

ALICE = "alice@example.com"
NO_ROOM = "452 4.3.1 Insufficient system storage, try again later"
MIB = 1024 * 1024


@pytest.fixture
def own_redis(tmp_path, settings) -> Any:
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url)
    add_mailbox(client, settings, ALICE)
    yield server, client
    client.close()
    server.stop()


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def settled(r: redis.Redis) -> int:
    """used_memory once Redis has let go of the buffers of a large write (bounded wait)."""
    last = used(r)
    for _ in range(50):
        time.sleep(0.2)
        now = used(r)
        if abs(now - last) < MIB // 4:
            return now
        last = now
    return last


def mail_reply(port: int, source: str = "127.0.0.2") -> str:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
        s.ehlo("client.remote.test")
        code, text = s.mail("s@remote.test")
        if code != 250:
            return f"{code} {text.decode()}"
        s.rcpt(ALICE)
        code, text = s.data(b"Subject: guard\r\n\r\nkept\r\n")
        return f"{code} {text.decode()}"


def wait_reply(port: int, want: str, accepted: list[str], tries: int = 40) -> str:
    """The guard reads INFO at most once a second: ask again until the answer changes
    (bounded); every message accepted meanwhile is added to `accepted`."""
    got = ""
    for _ in range(tries):
        got = mail_reply(port)
        if got.startswith("250"):
            accepted.append(got)
        if got.startswith(want):
            return got
        time.sleep(0.1)
    return got


def test_at_the_reserve_new_mail_waits_and_the_webmail_keeps_working(own_redis, settings,
                                                                      receiver_factory) -> None:
    server, r = own_redis
    # maxmemory with 20 MiB of room, 90 % reserve: used_memory is well under the reserve.
    r.config_set("maxmemory", used(r) + 20 * MIB)
    rt = receiver_factory(redis_url=server.url, memory_reserve="90%")
    accepted = [mail_reply(rt.port)]
    assert accepted[0].startswith("250 2.0.0")
    # Now the reserve (90 % of maxmemory) is passed with about 2 MiB left below maxmemory:
    # 20 MiB of other data, and maxmemory at used / 0.91.
    r.config_set("maxmemory", 0)
    r.set("filler", b"f" * (20 * MIB))
    r.config_set("maxmemory", int(settled(r) / 0.91))
    assert wait_reply(rt.port, "452", accepted) == NO_ROOM
    # The webmail: a log-in with its session, a flag change, a Sent copy all still work.
    app = make_app(settings, r, redis_url=server.url)
    client = app.test_client()
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    login = client.post("/login", data={"username": ALICE, "password": "secret", "csrf_token": token})
    assert login.status_code == 302 and not login.headers["Location"].endswith("/login")
    assert list(r.scan_iter("websess:*"))
    first = MailboxReader(r, ALICE).ids(fields.INBOX)[0]
    assert store.set_flags(r, ALICE, first, add=(fields.FLAGGED,))
    delivery.deliver(r, [delivery.Delivery(ALICE, "default", fields.SENT, (fields.SEEN,), "sent")],
                     "01SENTNOW", b"Subject: sent\r\n\r\nx\r\n")
    assert MailboxReader(r, ALICE).count(fields.SENT) == 1
    # Room again (an operator raised maxmemory): intake takes mail again.
    r.delete("filler")
    assert wait_reply(rt.port, "250", accepted).startswith("250 2.0.0")
    # Nothing accepted was lost: every message answered 250 is there, intact (the guard
    # answers from its last reading, so a few may have gone in before it saw the change).
    reader = MailboxReader(r, ALICE)
    raws = [reader.raw(i) or b"" for i in reader.ids(fields.INBOX)]
    assert len(raws) == len(accepted) >= 2
    assert all(x.endswith(b"Subject: guard\r\n\r\nkept\r\n") for x in raws)


def test_a_size_reserve_at_and_just_under(own_redis, settings, receiver_factory) -> None:
    """A size reserve works without maxmemory: refused at or past it, accepted just under."""
    server, r = own_redis
    r.config_set("maxmemory", 0)
    now = used(r)
    under = receiver_factory(redis_url=server.url, memory_reserve=str(now + 4 * MIB))
    assert mail_reply(under.port).startswith("250 2.0.0")
    at = receiver_factory(redis_url=server.url, memory_reserve=str(used(r)))
    assert mail_reply(at.port) == NO_ROOM
    past = receiver_factory(redis_url=server.url, memory_reserve=str(used(r) // 2))
    assert mail_reply(past.port) == NO_ROOM
    assert MailboxReader(r, ALICE).count(fields.INBOX) == 1


def test_the_refusal_is_a_mail_log_rejection(own_redis, settings, receiver_factory, caplog) -> None:
    """The mail-log line /metrics counts (event rejected, outcome 452 4.3.1)."""
    server, _ = own_redis
    rt = receiver_factory(redis_url=server.url, memory_reserve="1")
    with caplog.at_level("INFO", logger="fallback.mail"):
        assert mail_reply(rt.port) == NO_ROOM
    lines = [m for m in caplog.messages if "event=rejected" in m]
    assert lines and 'outcome="452 4.3.1"' in lines[0] and "from=s@remote.test" in lines[0]
    assert "memory reserve" in lines[0]
