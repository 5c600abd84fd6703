"""Redis memory and durability policy as operators see it: the embedded Redis's default
maxmemory, `fallback check` thresholds against the receiver's memory reserve, and
`fallback check` / `fallback status` on external redis-server instances configured each
way (eviction, appendfsync, no maxmemory, CONFIG disabled, a Cluster with one bad primary).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import embedded
from fallback.cli import main
from fallback.commands.check import memory_thresholds
from fallback.embedded import EmbeddedRedis, choose_maxmemory, machine_memory
from tests.servers import RedisClusterServers, RedisServer
from tests.test_up import Up, cli, data_dir  # noqa: F401 - data_dir is a fixture

GIB = 1 << 30


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Real redis-server processes (AOF, appendfsync always, noeviction unless `extra` says)."""
    made: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        made.append(RedisServer(tmp_path / f"redis{len(made)}", extra=list(extra)).start())
        return made[-1]

    yield make
    for server in made:
        server.stop()


def check(capsys: pytest.CaptureFixture[str], url: str, *flags: str) -> tuple[int, str]:
    code = main(["check", "--redis-url", url, *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    [line] = out.strip().splitlines()  # a plugin prints one status line
    return code, line


def status(capsys: pytest.CaptureFixture[str], url: str) -> tuple[str, dict[str, Any]]:
    assert main(["status", "--redis-url", url]) == 0
    table = capsys.readouterr().out
    assert main(["status", "--redis-url", url, "--format", "json"]) == 0
    return table, json.loads(capsys.readouterr().out)


# --- external Redis, configured each way ---------------------------------------------------

def test_a_durable_redis_with_a_maxmemory_has_no_policy_problem(
        servers: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = servers("--maxmemory", "1gb").url
    code, line = check(capsys, url)
    assert code == 0 and line.startswith("FALLBACK OK - ") and "Redis " not in line.split(" | ")[0]
    table, data = status(capsys, url)
    assert data["redis"]["problems"] == [] and "CRITICAL" not in table and "WARNING" not in table


def test_eviction_is_critical_in_check_and_status(servers: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = servers("--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru").url
    code, line = check(capsys, url)
    text = "Redis maxmemory-policy allkeys-lru: eviction can delete accepted mail (set noeviction)"
    assert code == 2 and line.startswith(f"FALLBACK CRITICAL - {text}"), line
    table, data = status(capsys, url)
    assert data["redis"]["problems"] == [{"severity": "critical", "text": text}]
    assert f"\nCRITICAL: {text}\n" in table


def test_appendfsync_everysec_warns_unless_replicas_acknowledge(
        servers: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    url = servers("--maxmemory", "1gb", "--appendfsync", "everysec").url
    code, line = check(capsys, url)
    text = ("Redis appendfsync everysec: up to 1 s of accepted mail is lost on power loss "
            "(set always, or replica_acks)")
    assert code == 1 and line.startswith(f"FALLBACK WARNING - {text}"), line
    table, data = status(capsys, url)
    assert data["redis"]["appendfsync"] == "everysec" and f"\nWARNING: {text}\n" in table
    monkeypatch.setenv("FALLBACK_REPLICA_ACKS", "1")  # each write waits for a replica: fine
    code, line = check(capsys, url)
    assert code == 0 and "Redis appendfsync everysec (replica_acks 1)" in line, line


def test_appendfsync_no_is_critical(servers: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = servers("--maxmemory", "1gb", "--appendfsync", "no").url
    code, line = check(capsys, url)
    assert code == 2 and "Redis appendfsync no: accepted mail may wait seconds for the disk" in line


def test_no_maxmemory_warns_with_a_percentage_reserve_only(
        servers: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    url = servers().url  # maxmemory 0
    code, line = check(capsys, url)
    text = ("Redis maxmemory 0 (no limit): the memory reserve (90%) needs a maxmemory, or give "
            "--memory-reserve a size")
    assert code == 1 and text in line, line
    assert "memory " in line and "% of system" in line  # measured against the machine's memory
    monkeypatch.setenv("FALLBACK_MEMORY_RESERVE", "64GiB")  # a size works without maxmemory
    code, line = check(capsys, url)
    assert code == 0 and "maxmemory 0" not in line, line


def test_config_disabled_reads_unknown_not_a_traceback(
        servers: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = servers("--maxmemory", "1gb", "--rename-command", "CONFIG", "").url
    with pytest.raises(redis.ResponseError):
        redis.Redis.from_url(url).config_get("appendfsync")  # really gone
    code, line = check(capsys, url)
    assert code == 0 and "Redis appendfsync unknown (CONFIG refused)" in line and "AOF ok" in line
    _, data = status(capsys, url)
    assert data["redis"]["appendfsync"] == "unknown"
    note = {"severity": "note", "text": "Redis appendfsync unknown (CONFIG refused)"}
    assert data["redis"]["problems"] == [note]


def test_cluster_every_primary_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = RedisClusterServers(tmp_path / "cluster", primaries=3, replicas=0).start()
    try:
        for node in cluster.nodes:
            cluster.client(node).config_set("maxmemory", GIB)
        code, line = check(capsys, cluster.url)
        assert code == 0 and "Redis " not in line.split(" | ")[0], line
        bad = cluster.nodes[1]
        cluster.client(bad).config_set("maxmemory-policy", "volatile-lru")
        code, line = check(capsys, cluster.url)
        assert code == 2, line
        assert (f"Redis on 127.0.0.1:{bad.port} maxmemory-policy volatile-lru: eviction can delete "
                "accepted mail") in line
    finally:
        cluster.stop()


# --- memory against the receiver's reserve -------------------------------------------------

@pytest.mark.parametrize("warn, crit, reserve, expected", [
    (80, 90, None, (80, 90)),     # no reserve to honour
    (80, 90, 90.0, (80, 90)),     # at the limit: unchanged
    (80, 90, 95.0, (80, 90)),     # above: CRITICAL still first
    (80, 90, 85.0, (75, 85)),     # below: CRITICAL at the reserve, WARNING as far before it
    (80, 90, 5.0, (0, 5)),
])
def test_thresholds_never_cross_the_reserve(warn: float, crit: float, reserve: float | None,
                                            expected: tuple[float, float]) -> None:
    assert memory_thresholds(warn, crit, reserve) == expected


@pytest.fixture
def half_full(r: redis.Redis) -> Iterator[int]:
    """The test Redis with maxmemory at twice what it uses: about 50 % full."""
    old = r.config_get("maxmemory")["maxmemory"]
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used * 2)
    yield used * 2
    r.config_set("maxmemory", old or 0)


@pytest.mark.parametrize("reserve, code, word", [
    ("75%", 0, "OK"),        # reserve above use: CRITICAL at 75, WARNING at 65
    ("55%", 1, "WARNING"),   # CRITICAL moved down to 55, WARNING to 45: ~50 % warns
])
def test_reserve_below_crit_moves_the_thresholds(
        r: redis.Redis, redis_url: str, half_full: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, reserve: str, code: int, word: str) -> None:
    monkeypatch.setenv("FALLBACK_MEMORY_RESERVE", reserve)
    got, line = check(capsys, redis_url, "--allow-no-aof")
    assert got == code and line.startswith(f"FALLBACK {word} - "), line
    share = float(reserve.rstrip("%"))
    assert "memory=" in line and line.split("memory=")[1].split()[0].endswith(
        f";{share - 10:g};{share:g};0;100")
    assert f"(reserve at {share:.1f}%)" in line and "intake refusing" not in line


@pytest.mark.parametrize("reserve", ["40%", "1KiB"])
def test_past_the_reserve_intake_refusing_is_critical(
        r: redis.Redis, redis_url: str, half_full: int, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, reserve: str) -> None:
    monkeypatch.setenv("FALLBACK_MEMORY_RESERVE", reserve)
    code, line = check(capsys, redis_url, "--allow-no-aof")
    assert code == 2, line
    m = re.match(r"FALLBACK CRITICAL - intake refusing new mail \(452 4\.3\.1\): used_memory "
                 r"(\d+\.\d (?:KiB|MiB|GiB)) of reserve (\d+\.\d (?:KiB|MiB|GiB))", line)
    assert m, line
    expected = int(half_full * 0.4) if reserve.endswith("%") else 1024
    assert m.group(2) == embedded.human_bytes(expected)


# --- the embedded Redis -------------------------------------------------------------------

def test_memory_of_the_machine_and_of_its_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nMemFree:  100 kB\n")
    root, own = tmp_path / "cgroup", tmp_path / "self-cgroup"
    (root / "svc").mkdir(parents=True)
    own.write_text("0::/svc\n")
    assert machine_memory(meminfo, root, own) == (8_192_000_000, "RAM")
    (root / "svc" / "memory.max").write_text("max\n")  # v2, no limit
    assert machine_memory(meminfo, root, own) == (8_192_000_000, "RAM")
    (root / "svc" / "memory.max").write_text(f"{2 * GIB}\n")  # v2 limit below the RAM
    assert machine_memory(meminfo, root, own) == (2 * GIB, "the cgroup memory limit")
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "none"
    own.write_text("4:memory:/job\n")
    assert machine_memory(meminfo, v1, own) == (8_192_000_000, "RAM")
    assert machine_memory(tmp_path / "missing", v1, own) is None
    assert choose_maxmemory(None, (2 * GIB, "the cgroup memory limit")) == (
        str(GIB), "1.0 GiB (50 % of the cgroup memory limit)")
    assert choose_maxmemory(None, None) == (
        "0", "0 (no limit: the machine's memory is unknown; set --redis-maxmemory)")
    assert choose_maxmemory("0", (2 * GIB, "RAM")) == ("0", "0 (no limit, redis_maxmemory 0)")
    assert choose_maxmemory("4gb", None) == ("4gb", "4gb (redis_maxmemory)")


@pytest.mark.parametrize("configured, expected", [(None, "default"), ("64mb", 64 << 20), ("0", 0)])
def test_embedded_redis_gets_a_maxmemory_and_noeviction(tmp_path: Path, configured: str | None,
                                                        expected: Any) -> None:
    emb = EmbeddedRedis(tmp_path / "data", maxmemory=configured)
    url = emb.start()
    try:
        r = redis.Redis.from_url(url)
        config = r.config_get("*")
        memory = machine_memory()
        assert memory is not None
        want = int(memory[0] * embedded.MEMORY_SHARE) if expected == "default" else expected
        assert int(config["maxmemory"]) == want
        assert config["maxmemory-policy"] == "noeviction" and config["appendfsync"] == "always"
        assert emb.summary().startswith(f"embedded Redis: maxmemory {emb.maxmemory_text}, noeviction, "
                                        "appendfsync always")
    finally:
        emb.stop()


def test_fallback_up_prints_the_embedded_maxmemory_and_checks_clean(data_dir: Path) -> None:  # noqa: F811
    up = Up(data_dir)
    try:
        [line] = [ln for ln in up.banner if "embedded Redis:" in ln]
        memory = machine_memory()
        assert memory is not None
        share = embedded.human_bytes(int(memory[0] * embedded.MEMORY_SHARE))
        assert line.startswith(f"fallback: embedded Redis: maxmemory {share} (50 % of {memory[1]}), "
                               "noeviction, appendfsync always"), line
        result = cli("check", "--data-dir", str(data_dir))
        assert result.returncode == 0, result.stdout
        assert result.stdout.startswith("FALLBACK OK - ") and "Redis " not in result.stdout.split(" | ")[0]
    finally:
        assert up.stop()[0] == 0
