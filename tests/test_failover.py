"""The failover scope (Redis), its commands, `fallback affected` and the audit log."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import pytest
import redis

from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets
from fallback.ops import audit, failover
from fallback.redisconn import async_client

STORES = ("store1", "store2", "store3")
ALL = set(STORES)


def provision(r: redis.Redis, settings: Settings) -> dict[str, str]:
    """Two mailboxes per mailstore; address -> mailstore."""
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    boxes = {f"u{i}.{s}@example.com": s for s in STORES for i in range(2)}
    for address, store in boxes.items():
        alt = f"{address.split('@')[0]}@home.example" if address.startswith("u0") else ""
        d.put(Mailbox(address, store, "{PLAIN}x", alt))
    return boxes


# (steps, mailstores affected afterwards); a step is ("start"|"stop", names or None for --all)
SEQUENCES = [
    ([], ALL),
    ([("start", None)], ALL),
    ([("start", ["store1"])], {"store1"}),
    ([("start", ["store1"]), ("start", ["store2"])], {"store1", "store2"}),
    ([("start", ["store1", "store2"]), ("stop", ["store1"])], {"store2"}),
    ([("start", ["store1"]), ("stop", ["store1"])], set()),
    ([("start", ["store1"]), ("start", None)], ALL),
    ([("start", ["store1"]), ("stop", None)], set()),
    ([("stop", None)], set()),
    ([("stop", ["store2"])], {"store1", "store3"}),        # from everyone: everyone but store2
    ([("start", None), ("stop", ["store3"])], {"store1", "store2"}),
    ([("stop", None), ("start", ["store3"])], {"store3"}),
    ([("start", ["store1"]), ("start", ["store1"])], {"store1"}),
]


@pytest.mark.parametrize("steps, expected", SEQUENCES)
def test_scope_sequences(r: redis.Redis, redis_url: str, steps: list[tuple[str, list[str] | None]],
                         expected: set[str]) -> None:
    for action, names in steps:
        if action == "start":
            failover.start(r, names)
        else:
            failover.stop(r, names, known=STORES)
    assert {s for s in STORES if failover.is_affected(r, s)} == expected
    scope = failover.read(r)
    assert {s for s in STORES if scope.covers(s)} == expected
    client = async_client(redis_url)

    async def via_async() -> set[str]:
        try:
            return {s for s in STORES if await failover.is_affected_async(client, s)}
        finally:
            await client.aclose()

    assert asyncio.run(via_async()) == expected


def test_first_declared_time_is_kept(r: redis.Redis) -> None:
    failover.start(r, ["store1"], now=1000.0)
    failover.start(r, ["store1", "store2"], now=2000.0)
    scope = failover.read(r)
    assert scope.mailstores == {"store1": 1000.0, "store2": 2000.0}
    assert scope.mode == failover.LISTED and scope.since == 1000.0


def test_cache_reuses_a_read_until_ttl(r: redis.Redis) -> None:
    now = [0.0]
    cache = failover.ScopeCache(ttl=2.0, clock=lambda: now[0])
    assert failover.is_affected(r, "store2", cache)
    failover.start(r, ["store1"])
    assert failover.is_affected(r, "store2", cache)  # still the cached read
    now[0] = 2.5
    assert not failover.is_affected(r, "store2", cache)
    assert failover.is_affected(r, "store1", cache)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_commands_and_audit(r: redis.Redis, settings: Settings, redis_url: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings)
    common = ["--redis-url", redis_url]
    code, out, _ = run(capsys, "failover", "status", *common)
    assert code == 0 and "no failover declared" in out and "6 mailbox(es) affected" in out

    code, out, _ = run(capsys, "failover", "start", "--mailstore", "store1", "store2", "--actor", "ana",
                       *common)
    assert code == 0 and "failed over: store1, store2 (4 mailbox(es) affected)" in out
    code, out, _ = run(capsys, "failover", "stop", "--mailstore", "store1", "--actor", "ben", *common)
    assert code == 0 and "failed over: store2 (2 mailbox(es) affected)" in out

    code, out, _ = run(capsys, "failover", "status", "--format", "json", *common)
    data = json.loads(out)
    assert data["scope"]["mode"] == "listed" and list(data["scope"]["mailstores"]) == ["store2"]
    assert data["affected"] == 2
    assert {m["mailstore"]: m["failed_over"] for m in data["mailstores"]} == {
        "store1": False, "store2": True, "store3": False}
    assert [a["action"] for a in data["recent_actions"]] == ["failover stop", "failover start"]

    entries = audit.recent(r)
    assert [(e.action, e.actor, e.args) for e in entries] == [
        ("failover stop", "ben", {"mailstores": ["store1"]}),
        ("failover start", "ana", {"mailstores": ["store1", "store2"]}),
    ]
    assert entries[0].outcome == "ok: failed over: store2" and entries[0].time > 0


def test_audit_file_copy_and_actor_from_environment(r: redis.Redis, settings: Settings, redis_url: str,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    provision(r, settings)
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SUDO_USER", "carla")
    monkeypatch.setenv("FALLBACK_AUDIT_LOG", str(log))
    assert run(capsys, "failover", "start", "--all", "--redis-url", redis_url)[0] == 0
    line = json.loads(log.read_text())
    assert line["actor"] == "carla" and line["action"] == "failover start" and line["args"] == {"all": True}
    assert audit.recent(r)[0].actor == "carla"
    assert audit.actor_name(None, {"USER": "dave"}) == "dave"
    assert audit.actor_name("erin", {"SUDO_USER": "carla"}) == "erin"


def test_audit_unwritable_file_is_reported_not_lost(r: redis.Redis, tmp_path: Path) -> None:
    entry = audit.Entry(action="failover start", actor="x", args={"all": True})
    problems = audit.record(r, entry, tmp_path / "no" / "such" / "dir.jsonl")
    assert len(problems) == 1 and "not written to" in problems[0]
    assert audit.recent(r)[0].action == "failover start"  # the Redis copy is there
    assert audit.record(None, entry, None) == ["audit entry not written: no Redis and no audit_log file"]


@pytest.mark.parametrize("argv, message", [
    (["start", "--mailstore", "stor1"], "unknown mailstore(s): stor1 (provisioned: store1, store2, store3); "
                                        "nothing changed; --force to declare anyway"),
    (["start", "--mailstore", "bad name!"], "not a mailstore name: 'bad name!'"),
    (["stop", "--mailstore", "nowhere"], "not failed over: nowhere"),
])
def test_bad_names_change_nothing(r: redis.Redis, settings: Settings, redis_url: str, argv: list[str],
                                  message: str, capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings)
    failover.start(r, ["store1"])
    before = r.hgetall("failover:scope")
    code, _, err = run(capsys, "failover", *argv, "--redis-url", redis_url)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert r.hgetall("failover:scope") == before
    assert audit.recent(r) == []


def test_force_declares_an_unprovisioned_mailstore(r: redis.Redis, settings: Settings, redis_url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings)
    code = run(capsys, "failover", "start", "--mailstore", "store9", "--force", "--redis-url", redis_url)[0]
    assert code == 0
    assert failover.is_affected(r, "store9") and not failover.is_affected(r, "store1")


@pytest.mark.parametrize("argv", [["failover", "start"], ["failover", "start", "--all", "--mailstore", "a"],
                                  ["failover"], ["affected", "--format", "xml"]])
def test_wrong_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_affected_formats(r: redis.Redis, settings: Settings, redis_url: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    boxes = provision(r, settings)
    url = ["--redis-url", redis_url]
    failover.start(r, ["store1", "store3"])
    expected = {a for a, s in boxes.items() if s in ("store1", "store3")}

    code, out, err = run(capsys, "affected", "--format", "csv", "--redis-url", redis_url)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {row["address"] for row in rows} == expected
    assert "4 affected mailbox(es)" in err
    alice = next(row for row in rows if row["address"] == "u0.store1@example.com")
    assert alice == {"address": "u0.store1@example.com", "domain": "example.com", "mailstore": "store1",
                     "alternate": "u0.store1@home.example"}

    code, out, _ = run(capsys, "affected", "--format", "json", "--mailstore", "store3", *url)
    data = json.loads(out)
    assert code == 0 and {d["address"] for d in data} == {a for a, s in boxes.items() if s == "store3"}

    code, out, _ = run(capsys, "affected", "--redis-url", redis_url)
    lines = out.splitlines()
    assert lines[0].split() == ["ADDRESS", "MAILSTORE", "ALTERNATE"]
    assert {line.split()[0] for line in lines[1:]} == expected

    # A mailstore outside the scope: an empty but valid document.
    code, out, _ = run(capsys, "affected", "--format", "json", "--mailstore", "store2", *url)
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, "affected", "--format", "csv", "--mailstore", "store2", *url)
    assert out == "address,domain,mailstore,alternate\n"


def test_affected_with_no_failover_lists_everyone(r: redis.Redis, settings: Settings, redis_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    boxes = provision(r, settings)
    code, out, _ = run(capsys, "affected", "--format", "json", "--redis-url", redis_url)
    assert code == 0 and {d["address"] for d in json.loads(out)} == set(boxes)


def test_affected_streams_many_mailboxes(r: redis.Redis, settings: Settings, redis_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    boxes = [Mailbox(f"user{i}@example.com", f"store{i % 4}", "{PLAIN}x") for i in range(20_000)]
    for start in range(0, len(boxes), 2000):
        d.put_many((m, None) for m in boxes[start:start + 2000])
    failover.start(r, ["store1"])
    code, out, err = run(capsys, "affected", "--format", "csv", "--redis-url", redis_url)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 5000 and "5000 affected mailbox(es)" in err
    assert {row["address"] for row in rows} == {m.address for m in boxes if m.mailstore == "store1"}
