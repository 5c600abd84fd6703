"""Forward dead letters: mail the next hop keeps refusing with 5xx is parked after
forward_dead_letter_after, kept byte for byte, shown and put back by the operator.

The next hop is a real aiosmtpd server whose answer at RCPT the test switches
between 550, 451 and 250 (the one fault a real MTA will not produce on
demand); the worker is the real Forwarder against the real test Redis, and the
operator commands run through the `fallback` CLI.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from aiosmtpd.controller import Controller

from fallback import ids, keys
from fallback.cli import main
from fallback.config import Settings
from fallback.maillog import LOGGER_NAME
from fallback.ops import audit, health
from fallback.ops.metrics import exposition
from fallback.queues import forward, forward_dead
from tests.conftest import add_mailbox
from tests.servers import free_port, wait_for
from tests.test_forward import BOB, CAROL, SENDER, ForwarderThread, attempts

RAW = b"Subject: refused\r\nFrom: <x@remote.test>\r\n\r\n8-bit \xc3\xa9, NUL-free, kept exactly\r\n.dot\r\n"


@pytest.fixture
def users(r: redis.Redis, settings: Settings) -> None:
    for address in (BOB, CAROL):  # provisioned on a mailstore that is not failed over
        add_mailbox(r, settings, address, mailstore="store2")


@pytest.fixture
def forwarders(settings: Settings) -> Iterator[Callable[..., ForwarderThread]]:
    """Real forward workers, retrying fast (as tests/test_forward.py runs them)."""
    started: list[ForwarderThread] = []

    def make(url: str, **overrides: Any) -> ForwarderThread:
        s = replace(settings, forward_to=url, forward_retry_base=0.2, forward_retry_max_interval=0.5,
                    claim_timeout=1.0, worker_concurrency=2, forward_timeout=10.0, **overrides)
        started.append(ForwarderThread(s).start())
        return started[-1]

    yield make
    for ft in started:
        ft.stop()


class Peer:
    """A next hop whose answer to RCPT is `mode` ("550", "451" or "250"); keeps what it took."""

    def __init__(self) -> None:
        self.replies = {"550": "550 5.1.1 <{}>: no such user here", "451": "451 4.3.0 try again later"}
        self.mode = "550"
        self.got: list[tuple[str, list[str], bytes]] = []
        self.rcpt_calls = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpt_calls += 1
        if self.mode != "250":
            return self.replies[self.mode].format(address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 kept"


@pytest.fixture
def peer() -> Iterator[tuple[Peer, int]]:
    handler = Peer()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False)
    ctl.start()
    yield handler, port
    ctl.stop()


def queue(r: redis.Redis, rcpts: list[str]) -> str:
    """The webmail's write into the forward queue (fallback.queues.forward.enqueue)."""
    msg_id = ids.new_id()
    forward.enqueue(r, rcpts, msg_id, RAW, SENDER)
    return msg_id


def record(r: redis.Redis, rcpt: str, msg_id: str) -> dict[str, bytes]:
    got: Any = r.hgetall(keys.forward_record(rcpt, msg_id))
    return {k.decode(): v for k, v in got.items()}


def parked(r: redis.Redis, rcpt: str, msg_id: str) -> bool:
    return r.zscore(keys.forward_dead_n(keys.forward_shard(rcpt)), f"{msg_id}\t{rcpt}") is not None


def forward_backlog(r: redis.Redis) -> health.Backlog:
    [b] = [b for b in health.backlogs(r) if b.name == "forward"]
    return b


def maillog(caplog: pytest.LogCaptureFixture, msg_id: str) -> list[str]:
    return [ln for ln in (rec.getMessage() for rec in caplog.records if rec.name == LOGGER_NAME)
            if f"id={msg_id}" in ln]


def cli_json(capsys: pytest.CaptureFixture[str], redis_url: str) -> dict[str, Any]:
    assert main(["queue", "forward-dead", "--format", "json", "--redis-url", redis_url]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_refused_throughout_is_parked_kept_shown_and_put_back(
        r: redis.Redis, redis_url: str, users: None, forwarders: Any, peer: tuple[Peer, int],
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO)
    handler, port = peer
    msg_id = queue(r, [BOB])
    forwarders(f"smtp://127.0.0.1:{port}", forward_dead_letter_after=0.6)
    wait_for(lambda: parked(r, BOB, msg_id), what="the refused forward to be parked")
    rec = record(r, BOB, msg_id)
    # Parked only once the run of 5xx lasted forward_dead_letter_after, with more than one refusal.
    assert float(rec["parked"]) - float(rec["refused_since"]) >= 0.6
    assert int(rec["attempts"]) >= 2 and handler.rcpt_calls == int(rec["attempts"])
    assert rec["dead"] == rec["reply"] and rec["reply"].startswith(b"550 5.1.1")
    # Kept whole: bytes and envelope, out of every retry path (stream, retry set, refused set).
    assert rec["raw"] == RAW
    assert rec["sender"] == SENDER.encode() and handler.got == []
    b = forward_backlog(r)
    assert (b.depth, b.dead, b.refused) == (0, 1, 0)
    assert not r.zscore(keys.forward_retry_n(keys.forward_shard(BOB)), f"{msg_id}\t{BOB}")
    lines = maillog(caplog, msg_id)
    [failed] = [ln for ln in lines if ln.startswith("event=failed")]
    assert "stage=forward" in failed and "parked as dead letter: next hop refused with 5xx" in failed
    assert not any(ln.startswith(("event=bounced", "event=forwarded")) for ln in lines)
    # Alerted: `fallback check` and /metrics.
    assert main(["check", "--redis-url", redis_url, "--allow-no-aof"]) == 1
    line = capsys.readouterr().out.strip()
    assert "forward queue 1 dead letter(s) (fallback queue forward-dead)" in line, line
    assert 'fallback_queue_dead_letters{queue="forward"} 1.0' in exposition(r).decode()

    # The operator's list: queue id, from, to, first refused, last reply.
    listing = cli_json(capsys, redis_url)
    assert listing["total"] == 1
    [row] = listing["dead_letters"]
    assert (row["id"], row["sender"], row["recipient"]) == (msg_id, SENDER, BOB)
    assert row["last_reply"].startswith("550 5.1.1") and row["first_refused"].endswith(" ago")
    assert row["size"] == len(rec["raw"])
    assert main(["queue", "forward-dead", "--redis-url", redis_url]) == 0
    assert "forward dead letters: 1" in capsys.readouterr().out

    # Put back once the main system takes it: delivered once, bytes unchanged, nothing left.
    handler.mode = "250"
    assert main(["queue", "forward-retry", msg_id, "--redis-url", redis_url, "--actor", "ops"]) == 0
    assert f"{msg_id} to {BOB}: back in the forward queue" in capsys.readouterr().out
    wait_for(lambda: handler.got, what="the delivery after forward-retry")
    wait_for(lambda: not r.exists(keys.forward_record(BOB, msg_id)), what="the record to be finished")
    [(sender, rcpts, data)] = handler.got
    assert (sender, rcpts, data) == (SENDER, [BOB], rec["raw"])
    b = forward_backlog(r)
    assert (b.depth, b.dead, b.refused) == (0, 0, 0)
    assert any(ln.startswith("event=forwarded") for ln in maillog(caplog, msg_id))
    [entry] = [e for e in audit.recent(r) if e.action == "queue forward-retry"]
    assert entry.actor == "ops" and entry.args == {"id": msg_id} and entry.outcome == "ok: 1 of 1 put back"


def test_not_parked_before_the_time_then_parked_after_it(
        r: redis.Redis, users: None, forwarders: Any, peer: tuple[Peer, int]) -> None:
    handler, port = peer
    msg_id = queue(r, [BOB])
    forwarders(f"smtp://127.0.0.1:{port}", forward_dead_letter_after=3600.0)
    wait_for(lambda: attempts(r, BOB, msg_id) >= 1, what="a first refusal")
    first = record(r, BOB, msg_id)["refused_since"]
    wait_for(lambda: attempts(r, BOB, msg_id) >= 3, what="three refusals")
    rec = record(r, BOB, msg_id)
    # Measured from the first 5xx, which later refusals do not move; an hour is not over.
    assert rec["refused_since"] == first and "parked" not in rec and not parked(r, BOB, msg_id)
    assert forward_backlog(r).refused == 1
    # As if that first refusal had been an hour ago: the next 5xx parks it.
    r.hset(keys.forward_record(BOB, msg_id), "refused_since", float(first) - 3600)
    wait_for(lambda: parked(r, BOB, msg_id), what="parking once the hour is over")
    assert record(r, BOB, msg_id)["raw"] == RAW and handler.got == []


def test_a_4xx_in_between_starts_the_run_again(
        r: redis.Redis, users: None, forwarders: Any, peer: tuple[Peer, int]) -> None:
    handler, port = peer
    msg_id = queue(r, [BOB])
    forwarders(f"smtp://127.0.0.1:{port}", forward_dead_letter_after=3600.0)
    wait_for(lambda: attempts(r, BOB, msg_id) >= 1, what="a first refusal")
    handler.mode = "451"
    # Refused "two hours ago": without the 4xx in between, the next 5xx would park it.
    r.hset(keys.forward_record(BOB, msg_id), "refused_since", time.time() - 7200)
    seen = attempts(r, BOB, msg_id)
    wait_for(lambda: attempts(r, BOB, msg_id) > seen and "refused_since" not in record(r, BOB, msg_id),
             what="a 4xx to end the run of refusals")
    assert record(r, BOB, msg_id)["code"] == b"451" and forward_backlog(r).refused == 0
    handler.mode = "550"
    seen = attempts(r, BOB, msg_id)
    wait_for(lambda: attempts(r, BOB, msg_id) >= seen + 2, what="two more refusals")
    rec = record(r, BOB, msg_id)
    assert "parked" not in rec and not parked(r, BOB, msg_id) and rec["code"] == b"550"
    assert float(rec["refused_since"]) > time.time() - 3600  # a new run, started after the 4xx
    handler.mode = "250"
    wait_for(lambda: not r.exists(keys.forward_record(BOB, msg_id)), what="delivery")
    assert [rcpts for _, rcpts, _ in handler.got] == [[BOB]]


def test_retry_all_and_unknown_ids(r: redis.Redis, redis_url: str, users: None,
                                   forwarders: Any, peer: tuple[Peer, int],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    handler, port = peer
    first, second = queue(r, [BOB, CAROL]), queue(r, [BOB])
    ft = forwarders(f"smtp://127.0.0.1:{port}", forward_dead_letter_after=0.3)
    wait_for(lambda: len(forward_dead.scan(r)) == 3, what="three parked records")
    assert {(d.msg_id, d.recipient) for d in forward_dead.scan(r)} == {
        (first, BOB), (first, CAROL), (second, BOB)}
    # An id that is not parked: one line naming it, exit 1, nothing changed.
    assert main(["queue", "forward-retry", "01NOSUCHID", "--redis-url", redis_url]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("fallback queue: 01NOSUCHID: no forward dead letter with this id "
                   "(fallback queue forward-dead lists them)")
    assert len(forward_dead.scan(r)) == 3
    # Neither an id nor --all: usage, exit 2; both: the same.
    for argv in (["queue", "forward-retry"], ["queue", "forward-retry", first, "--all"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--redis-url", redis_url])
        assert info.value.code == 2
        assert "usage: fallback queue forward-retry" in capsys.readouterr().err
    assert ft.forwarder is not None
    ft.call(ft.forwarder.stop())  # keep them parked while we look
    handler.mode = "250"
    assert main(["queue", "forward-retry", "--all", "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    assert out.count("back in the forward queue") == 3
    assert forward_dead.scan(r) == [] and forward_backlog(r).depth == 3
    # Nothing parked any more: --all says so and succeeds.
    assert main(["queue", "forward-retry", "--all", "--redis-url", redis_url]) == 0
    assert "no forward dead letters" in capsys.readouterr().out
    forwarders(f"smtp://127.0.0.1:{port}", forward_dead_letter_after=0.3)
    wait_for(lambda: len(handler.got) == 3, what="all three delivered")
    assert sorted((rcpts[0], data == RAW) for _, rcpts, data in handler.got) == [
        (BOB, True), (BOB, True), (CAROL, True)]
    wait_for(lambda: forward_backlog(r).depth == 0, what="the queue to drain")
    assert not r.keys("fwdq:*:r:*")
