"""`fallback queue list|show|retry|hold|delete --forward` against real forward-queue entries.

The entries are queued by the real receiver for users whose mailstore is
healthy (only store1 is failed over: bob and carol are forwarded), and
forwarded by the real forward worker to Postfix's smtp-sink.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.cli import main
from fallback.config import Settings
from fallback.ops import audit
from fallback.queues import forward_ops
from tests import test_forward as fw
from tests.servers import free_port, sink_payload, wait_for
from tests.test_forward import BOB, CAROL, ForwarderThread, forwarded, queued

users, forwarders, sinks, fwd_settings = fw.users, fw.forwarders, fw.sinks, fw.fwd_settings  # fixtures
UNKNOWN = "01M8566TE4ZJXM1JJ2TXRSTKEP"


def cli(redis_url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis-url", redis_url])
    got = capsys.readouterr()
    return code, got.out, got.err


def listed(redis_url: str, capsys: pytest.CaptureFixture[str]) -> dict[tuple[str, str], dict[str, Any]]:
    code, out, _ = cli(redis_url, capsys, "queue", "list", "--forward", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["total"] == len(data["messages"])
    return {(m["id"], m["recipient"]): m for m in data["messages"]}


def test_list_show_hold_delete_retry(r: redis.Redis, users: dict[str, str], receiver_factory: Any,
                                     redis_url: str, sinks: Any, forwarders: Any,
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    m1 = queued(r, users, receiver_factory, b"Subject: one\r\n\r\nfor two\r\n", rcpts=(BOB, CAROL))
    m2 = queued(r, users, receiver_factory, b"Subject: two\r\n\r\nfor bob\r\n")
    m3 = queued(r, users, receiver_factory, b"Subject: three\r\n\r\nto delete\r\n", rcpts=(CAROL,))
    raw1 = {rcpt: forwarded(r, rcpt, m1)["raw"] for rcpt in (BOB, CAROL)}

    rows = listed(redis_url, capsys)
    assert set(rows) == {(m1, BOB), (m1, CAROL), (m2, BOB), (m3, CAROL)}
    assert all(row["state"] == "waiting" and row["sender"] == fw.SENDER and row["attempts"] == 0
               for row in rows.values())
    code, out, _ = cli(redis_url, capsys, "queue", "list", "--forward")
    assert code == 0 and "forward queue: 4 message(s)" in out and m1 in out and CAROL in out
    for column in ("age", "attempts", "next try", "last reply"):
        assert column in out
    code, out, _ = cli(redis_url, capsys, "queue", "show", m1, "--forward")
    assert code == 0 and f"id:        {m1}" in out and BOB in out and CAROL in out and "waiting" in out

    # Hold m1: both recipients kept here, untried.
    code, out, _ = cli(redis_url, capsys, "queue", "hold", m1, "--forward", "--actor", "ops-anna")
    assert code == 0 and out.count("held (kept here, not forwarded)") == 2
    rows = listed(redis_url, capsys)
    assert rows[(m1, BOB)]["state"] == rows[(m1, CAROL)]["state"] == "held"

    # Delete m3: not without confirmation; then with --yes, bytes and entries gone.
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, _, err = cli(redis_url, capsys, "queue", "delete", m3, "--forward")
    assert code == 1 and err == f"fallback queue: not deleting {m3} without confirmation: give --yes\n"
    assert forwarded(r, CAROL, m3)
    code, out, _ = cli(redis_url, capsys, "queue", "delete", m3, "--forward", "--yes", "--actor", "ops-anna")
    assert code == 0 and f"deleted {m3} from the forward queue: 1 recipient(s) ({CAROL})" in out
    assert not forwarded(r, CAROL, m3) and (m3, CAROL) not in listed(redis_url, capsys)

    # The worker forwards m2 and leaves the held m1 alone.
    sink = sinks()
    forwarders(f"smtp://127.0.0.1:{sink.port}")
    wait_for(lambda: not r.exists(keys.forward_record(BOB, m2)), what="m2 forwarded")
    assert len(sink.messages()) == 1
    assert all(forwarded(r, rcpt, m1)["attempts"] == b"0" for rcpt in (BOB, CAROL))
    assert set(listed(redis_url, capsys)) == {(m1, BOB), (m1, CAROL)}

    # Retry lets m1 go: both recipients reach the sink, bytes unchanged.
    code, out, _ = cli(redis_url, capsys, "queue", "retry", m1, "--forward", "--actor", "ops-anna")
    assert code == 0 and out.count("queued for forwarding now") == 2
    wait_for(lambda: not r.keys("fwdq:*:r:*"), what="m1 forwarded after the retry")
    got = [sink_payload(d) for d in sink.messages()]
    assert sorted(rcpts for rcpts, _ in got) == [[BOB], [BOB], [CAROL]]  # m2, then m1 to both
    for rcpt in (BOB, CAROL):
        assert ([rcpt], raw1[rcpt].replace(b"\r\n", b"\n")) in got
    assert listed(redis_url, capsys) == {}
    assert not any(r.zcard(keys.forward_held_n(n)) for n in range(keys.FORWARD_SHARDS))

    done = [(e.action, e.actor, e.args["id"]) for e in audit.since(r, 3600)]
    for action, msg_id in (("queue forward-hold", m1), ("queue forward-delete", m3),
                           ("queue forward-retry", m1)):
        assert (action, "ops-anna", msg_id) in done


def test_retry_makes_a_waiting_retry_due_now(r: redis.Redis, users: dict[str, str], receiver_factory: Any,
                                             redis_url: str, sinks: Any, fwd_settings: Settings,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    msg_id = queued(r, users, receiver_factory, b"Subject: later\r\n\r\nretry me\r\n")
    # The next hop is down and the back-off is long: the record waits in the retry zset.
    slow = replace(fwd_settings, forward_retry_base=600.0, forward_retry_max_interval=1200.0)
    down = ForwarderThread(replace(slow, forward_to=f"smtp://127.0.0.1:{free_port()}")).start()
    try:
        wait_for(lambda: forwarded(r, BOB, msg_id).get("attempts") == b"1", what="a failed attempt")
    finally:
        down.stop()
    [row] = listed(redis_url, capsys).values()
    assert row["state"] == "retry" and row["next"].startswith("in ") and row["attempts"] == 1
    assert "next hop" in row["last_reply"]
    code, out, _ = cli(redis_url, capsys, "queue", "show", msg_id, "--forward")
    assert code == 0 and "retry" in out and "in " in out

    sink = sinks()
    up = ForwarderThread(replace(slow, forward_to=f"smtp://127.0.0.1:{sink.port}")).start()
    try:
        code, out, _ = cli(redis_url, capsys, "queue", "retry", msg_id, "--forward")
        assert code == 0 and f"{msg_id} to {BOB}: queued for forwarding now" in out
        wait_for(lambda: not r.exists(keys.forward_record(BOB, msg_id)), what="forwarded after the retry")
    finally:
        up.stop()
    [dump] = sink.messages()
    assert sink_payload(dump)[0] == [BOB]


@pytest.mark.parametrize("argv, message", [
    (["show", "nonsense", "--forward"],
     "'nonsense' is not a message id (26 characters, as `fallback queue list --forward` shows)"),
    (["show", UNKNOWN, "--forward"], f"message {UNKNOWN} is not in the forward queue"),
    (["retry", UNKNOWN, "--forward"], f"message {UNKNOWN} is not in the forward queue"),
    (["hold", UNKNOWN, "--forward"], f"message {UNKNOWN} is not in the forward queue"),
    (["delete", UNKNOWN, "--forward", "--yes"], f"message {UNKNOWN} is not in the forward queue"),
    (["hold", "--forward"], "hold --forward takes a message ID (fallback queue list --forward), not --user"),
    (["hold", "--forward", UNKNOWN, "--user", BOB],
     "hold --forward takes a message ID (fallback queue list --forward), not --user"),
    (["hold"], "hold takes --user ADDRESS (or --forward ID for the forward queue)"),
    (["list", "--forward", "--limit", "0"], "--limit must be greater than 0"),
])
def test_bad_input(r: redis.Redis, users: dict[str, str], receiver_factory: Any, redis_url: str,
                   capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    kept = queued(r, users, receiver_factory, b"Subject: keep\r\n\r\nkeep me\r\n")
    code, out, err = cli(redis_url, capsys, "queue", *argv)
    assert code == 1 and out == "" and err == f"fallback queue: {message}\n"
    assert [(i.msg_id, i.recipient, i.where) for i in forward_ops.scan(r)] == [(kept, BOB, "waiting")]


def test_delete_refuses_a_record_being_forwarded(r: redis.Redis, users: dict[str, str],
                                                 receiver_factory: Any, redis_url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    msg_id = queued(r, users, receiver_factory, b"Subject: busy\r\n\r\nbusy\r\n")
    r.set(keys.forward_lease(BOB, msg_id), "some-worker", px=60_000)
    for argv in (["delete", msg_id, "--forward", "--yes"], ["hold", msg_id, "--forward"]):
        code, _, err = cli(redis_url, capsys, "queue", *argv)
        assert code == 1 and err == (f"fallback queue: message {msg_id} for {BOB} is being forwarded right "
                                     "now; try again in a moment\n")
    assert forwarded(r, BOB, msg_id)["raw"] and not forwarded(r, BOB, msg_id).get("parked")
