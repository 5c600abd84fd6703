"""--demo stays on this machine, and a real start refuses while the demo mailbox exists.

Through the real CLI (in-process `main` for refusals, which happen before
anything starts; `python -m fallback` processes where a start must succeed),
against the real test redis-server.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from fallback.cli import main
from fallback.config import Settings
from fallback.mailbox import directory
from fallback.service import DEMO_ADDRESS, Service, demo_refusal
from tests.conftest import add_mailbox
from tests.servers import free_port, stop_pid
from tests.test_up import ROOT, clean_env

TAIL = "the demo mailbox (demo@example.com / demo)"


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a start that must be refused: exit 1, one line on stderr, nothing on stdout."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, line", [
    (["--redis-url", "redis://10.0.0.5:6379"],
     f"--demo: redis_url redis://10.0.0.5:6379 is not on this machine; {TAIL} must never exist on a "
     "real Redis"),
    (["--redis-url", "redis://:hunter2@db.example.net:6379/0"],
     f"--demo: redis_url redis://:***@db.example.net:6379/0 is not on this machine; {TAIL} must never "
     "exist on a real Redis"),
    (["--redis-url", "redis+cluster://127.0.0.1:7000,192.0.2.9:7001"],
     f"--demo: redis_url redis+cluster://127.0.0.1:7000,192.0.2.9:7001 is not on this machine; {TAIL} "
     "must never exist on a real Redis"),
    (["--smtp-host", "0.0.0.0"],
     f"--demo: smtp_host 0.0.0.0 listens on every interface; {TAIL} must only be reachable from this "
     "machine: use 127.0.0.1"),
    (["--http-host", "::"],
     f"--demo: http_host :: listens on every interface; {TAIL} must only be reachable from this machine: "
     "use 127.0.0.1"),
    (["--http-host", "192.0.2.1"],
     f"--demo: http_host 192.0.2.1 is not a loopback address; {TAIL} must only be reachable from this "
     "machine: use 127.0.0.1"),
])
@pytest.mark.parametrize("command", ["up", "web", "smtp"])
def test_demo_off_this_machine_is_refused_with_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        command: str, argv: list[str], line: str) -> None:
    monkeypatch.delenv("FALLBACK_REDIS_URL", raising=False)
    data = tmp_path / "data"
    assert refused(capsys, command, "--demo", "--data-dir", str(data), *argv) == f"fallback {command}: {line}"
    assert not (data / "redis").exists()  # refused before an embedded Redis was even started


@pytest.mark.parametrize("changes", [
    {}, {"redis_url": "redis://127.0.0.1:6379/0"}, {"redis_url": "redis://localhost"},
    {"redis_url": "redis://[::1]:6379"}, {"redis_url": "unix:///run/redis/redis.sock"},
    {"redis_url": "redis+sentinel://127.0.0.1:26379,127.0.0.2:26379/fallback"},
    {"smtp_host": "127.0.0.2", "http_host": "localhost"}, {"smtp_host": "::1"},
])
def test_demo_on_this_machine_is_fine(settings: Settings, changes: dict[str, str]) -> None:
    assert demo_refusal(replace(settings, **{"demo": True, "redis_url": None, **changes})) is None


@pytest.fixture
def demo_mailbox(r: redis.Redis, settings: Settings, redis_url: str) -> str:
    """A Redis a `fallback up --demo` has run against, where a real user was provisioned later."""
    Service(replace(settings, demo=True)).provision_demo(redis_url)
    add_mailbox(r, settings, "alice@example.com")
    return redis_url


def mailbox(r: redis.Redis, address: str) -> directory.Mailbox | None:
    return directory.Directory(r, directory.ensure_buckets(r, 64)).get(address)


@pytest.mark.parametrize("command", ["up", "smtp", "web"])
def test_real_start_refuses_while_the_demo_mailbox_exists(
        r: redis.Redis, demo_mailbox: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.setenv("FALLBACK_SECRET_KEY", "test-secret-" + "k" * 40)
    before = (mailbox(r, DEMO_ADDRESS), mailbox(r, "alice@example.com"))
    line = refused(capsys, command, "--redis-url", demo_mailbox, "--smtp-port", "0",
                   "--http-port", str(free_port()))
    assert line == (f"fallback {command}: the demo mailbox demo@example.com (password demo) exists in "
                    "this Redis; remove it before a real start: fallback mailbox remove "
                    "demo@example.com --force (or run with --demo, on this machine only)")
    assert (mailbox(r, DEMO_ADDRESS), mailbox(r, "alice@example.com")) == before  # nothing touched
    assert before[0] is not None and before[1] is not None


def test_after_removing_the_demo_mailbox_a_real_start_runs(
        r: redis.Redis, demo_mailbox: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mailbox", "remove", DEMO_ADDRESS, "--redis-url", demo_mailbox]) == 0
    assert f"removed {DEMO_ADDRESS}" in capsys.readouterr().out
    assert mailbox(r, DEMO_ADDRESS) is None and mailbox(r, "alice@example.com") is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "fallback", "smtp", "--redis-url", demo_mailbox, "--smtp-port", "0",
         "--hostname", "real.test"],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while len(lines) < 10 and not (lines and ("ready" in lines[-1] or not lines[-1])):
            lines.append(proc.stdout.readline())  # "" once it exits: the loop ends either way
        assert any("SMTP receiver on 127.0.0.1:" in ln for ln in lines) and "ready" in lines[-1], lines
    finally:
        stop_pid(proc)  # type: ignore[arg-type]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]


def test_demo_on_a_redis_with_real_mailboxes_is_refused(
        r: redis.Redis, settings: Settings, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    add_mailbox(r, settings, "alice@example.com")
    add_mailbox(r, settings, "bob@example.com")
    line = refused(capsys, "up", "--demo", "--redis-url", redis_url, "--smtp-port", "0",
                   "--http-port", str(free_port()))
    assert line == ("fallback up: --demo: this Redis already holds 2 other provisioned mailbox(es), so it "
                    f"is a real one; {TAIL} must never exist on a real Redis: use another --data-dir")
    assert mailbox(r, DEMO_ADDRESS) is None and mailbox(r, "alice@example.com") is not None


def test_demo_refusal_from_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fallback", "up", "--demo", "--data-dir", str(tmp_path / "d"),
         "--redis-url", "redis://10.0.0.5:6379"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"fallback up: --demo: redis_url redis://10.0.0.5:6379 is not on this machine; "
                           f"{TAIL} must never exist on a real Redis\n")
