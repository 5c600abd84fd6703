"""`fallback check`: Nagios exit codes at each threshold, against the real test Redis."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis

from fallback import ids, keys
from fallback.cli import main
from fallback.ops import health
from tests.servers import free_port


def check(capsys: pytest.CaptureFixture[str], redis_url: str, *flags: str) -> tuple[int, str]:
    code = main(["check", "--redis-url", redis_url, *flags])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # a plugin prints one status line
    return code, lines[0]


def perfdata(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split(" | ", 1)[1].split())


def add_old(r: redis.Redis, key: str, age_seconds: float) -> None:
    now_ms = health.redis_now_ms(r)
    r.xadd(key, {"a": "alice@example.com", "id": "x"}, id=f"{now_ms - int(age_seconds * 1000)}-0")


@pytest.fixture(autouse=True)
def memory_limit(r: redis.Redis) -> Iterator[None]:
    """A Redis with a maxmemory, as `fallback up` runs it (maxmemory 0 is a WARNING of its own:
    tests/test_memory_policy.py)."""
    old = r.config_get("maxmemory")["maxmemory"]
    r.config_set("maxmemory", 1 << 30)
    yield
    r.config_set("maxmemory", old)


def test_all_ok(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = check(capsys, redis_url)
    assert code == 0 and line.startswith("FALLBACK OK - ")
    perf = perfdata(line)
    assert perf["outbound_age"] == "0s;3600;14400;0" and perf["outbound_depth"] == "0;;;0"
    assert perf["forward_age"].startswith("0s;") and "memory" in perf


@pytest.mark.parametrize("age, expected, word", [
    (60, 0, "OK"), (2 * 3600, 1, "WARNING"), (5 * 3600, 2, "CRITICAL"),
])
def test_outbound_queue_age_thresholds(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str],
                                       age: float, expected: int, word: str) -> None:
    add_old(r, keys.outbound_stream_n(3), age)
    add_old(r, keys.outbound_stream_n(3), 1)
    code, line = check(capsys, redis_url, "--warn-queue-age", "1h", "--crit-queue-age", "4h")
    assert code == expected and line.startswith(f"FALLBACK {word} - ")
    assert "outbound queue 2 oldest" in line
    seconds = int(perfdata(line)["outbound_age"].split("s;")[0])
    assert seconds >= age


def test_forward_queue_age_counts_too(r: redis.Redis, redis_url: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    add_old(r, keys.forward_stream_n(7), 600)
    code, line = check(capsys, redis_url, "--warn-queue-age", "300", "--crit-queue-age", "900")
    assert code == 1 and "forward queue 1 oldest 10m" in line


def test_queue_age_follows_the_consumer_group(r: redis.Redis, redis_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Pending (taken, not acknowledged) work still counts; acknowledged work does not."""
    key = keys.outbound_stream_n(0)
    add_old(r, key, 3 * 3600)
    r.xgroup_create(key, "workers", id="0")
    flags = ("--warn-queue-age", "1h", "--crit-queue-age", "2h")
    assert check(capsys, redis_url, *flags)[0] == 2  # not yet delivered to a worker
    [[_, [(entry_id, _)]]] = r.xreadgroup("workers", "w1", {key: ">"}, count=1)
    code, line = check(capsys, redis_url, *flags)
    assert code == 2 and "outbound queue 1 oldest" in line  # pending in w1
    r.xack(key, "workers", entry_id)
    code, line = check(capsys, redis_url, *flags)
    assert code == 0 and "outbound queue 0 oldest 0s" in line


@pytest.mark.parametrize("warn, crit, expected", [
    ("70", "80", 0),   # ~50 %: below both
    ("40", "60", 1),
    ("20", "30", 2),
])
def test_memory_thresholds(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str],
                           memory_limit: None, warn: str, crit: str, expected: int) -> None:
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used * 2)
    code, line = check(capsys, redis_url, "--warn-memory", warn, "--crit-memory", crit)
    assert code == expected, line
    pct = float(re.search(r"memory (\d+\.\d)% of maxmemory", line).group(1))  # type: ignore[union-attr]
    assert 40 < pct < 60
    assert perfdata(line)["memory"].endswith(f"%;{warn};{crit};0;100")


def test_aof_off_is_critical_unless_allowed(r: redis.Redis, redis_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    r.config_set("appendonly", "no")
    try:
        code, line = check(capsys, redis_url)
        assert code == 2 and "AOF off: accepted mail is not durable" in line
        code, line = check(capsys, redis_url, "--allow-no-aof")
        assert code == 0 and "AOF off (allowed)" in line
    finally:
        r.config_set("appendonly", "yes")


def test_redis_unreachable_is_critical(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, line = check(capsys, url)
    assert code == 2 and line.startswith(f"FALLBACK CRITICAL - Redis at {url} does not answer")


def test_no_redis_configured_is_unknown(tmp_path: object, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FALLBACK_REDIS_URL", raising=False)
    code = main(["check", "--data-dir", str(tmp_path)])
    assert code == 3 and capsys.readouterr().out.startswith("FALLBACK UNKNOWN - no Redis")


@pytest.mark.parametrize("flags, message", [
    (["--warn-memory", "95", "--crit-memory", "90"], "check_warn_memory: must not be above"),
    (["--warn-memory", "150"], "check_warn_memory: 150.0 is not a percentage"),
    (["--crit-queue-age", "soon"], "not a duration"),
])
def test_bad_thresholds_are_unknown(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str],
                                    flags: list[str], message: str) -> None:
    code = main(["check", "--redis-url", redis_url, *flags])
    assert code == 3 and message in capsys.readouterr().err


def test_retry_set_and_requeued_entries_count_from_the_message_id(
        r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    now = health.redis_now_ms(r)
    flags = ("--warn-queue-age", "1h", "--crit-queue-age", "4h")
    # Waiting for its next attempt: only in the retry set, sent 2 h ago.
    r.zadd(keys.outbound_retry_n(5), {f"{ids.new_id(now - 2 * 3600_000)}\talice@example.com": now / 1000})
    code, line = check(capsys, redis_url, *flags)
    assert code == 1 and "outbound queue 1 oldest 2.0h" in line
    # Put back on the stream just now, but sent 5 h ago: the message id tells.
    r.xadd(keys.outbound_stream_n(6), {"a": "bob@example.com", "id": ids.new_id(now - 5 * 3600_000)})
    code, line = check(capsys, redis_url, *flags)
    assert code == 2 and "outbound queue 2 oldest 5.0h" in line


def test_deleted_after_ack_is_finished(r: redis.Redis, redis_url: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The outbound worker XACKs and XDELs: what is left in the stream is the work."""
    key = keys.outbound_stream_n(1)
    r.xgroup_create(key, "workers", id="0", mkstream=True)
    add_old(r, key, 3 * 3600)
    add_old(r, key, 60)
    [[_, entries]] = r.xreadgroup("workers", "w1", {key: ">"}, count=1)
    r.xack(key, "workers", entries[0][0])
    r.xdel(key, entries[0][0])
    code, line = check(capsys, redis_url, "--warn-queue-age", "1h", "--crit-queue-age", "2h")
    assert code == 0 and "outbound queue 1 oldest 60s" in line


def test_dead_letters_warn(r: redis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    r.zadd(keys.outbound_dead_n(2), {f"{ids.new_id()}\talice@example.com": 1.0})
    code, line = check(capsys, redis_url)
    assert code == 1 and "outbound queue 1 dead letter(s)" in line
    assert perfdata(line)["outbound_dead"] == "1;1;;0"


def test_missing_flag_value_is_unknown_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "--warn-memory"])
    assert info.value.code == 3
    out, err = capsys.readouterr()
    assert out.startswith("FALLBACK UNKNOWN - argument --warn-memory: expected one argument")
    assert err.startswith("usage: fallback check")
