"""The command line never shows a traceback: usage for wrong flags, one line for every failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fallback.cli import main
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def fallback(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fallback", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("argv", [
    ["--no-such-flag"],
    [],
    ["provision"],
    ["export", "a@example.com", "--format", "tar"],
    ["status", "--format", "yaml"],
    ["mailbox", "frobnicate", "a@example.com"],
    ["up", "--smtp-prot", "25"],
])
def test_wrong_usage_prints_usage_and_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fallback") and "error:" in err and "Traceback" not in err


def test_redis_unreachable_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for argv in (["status"], ["export", "a@example.com"], ["mailbox", "show", "a@example.com"]):
        assert main([*argv, "--redis-url", url]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"fallback {argv[0]}: Redis at {url} does not answer"), err
        assert len(err.strip().splitlines()) == 1


def test_password_in_url_is_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--redis-url", f"redis://:hunter2@127.0.0.1:{free_port()}/0"]) == 1
    err = capsys.readouterr().err
    assert "hunter2" not in err and ":***@" in err


def test_missing_file_and_unexpected_error(redis_url: str, r: Any, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert main(["provision", str(tmp_path / "nope.csv"), "--redis-url", redis_url]) == 1
    assert capsys.readouterr().err == f"fallback provision: {tmp_path / 'nope.csv'}: no such file\n"

    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr("fallback.commands.status.mailstore_stats", broken)
    assert main(["status", "--redis-url", redis_url]) == 1
    err = capsys.readouterr().err
    assert err == ("fallback status: internal error: KeyError: 'surprise' "
                   "(run again with --debug for details)\n")
    with pytest.raises(KeyError):
        main(["status", "--redis-url", redis_url, "--debug"])


def test_real_process_no_traceback(tmp_path: Path) -> None:
    done = fallback("status", "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("fallback status: no Redis: give --redis-url")
    assert "Traceback" not in done.stderr
    done = fallback("export")
    assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr
    done = fallback("--help")
    assert done.returncode == 0 and "provision" in done.stdout and "export" in done.stdout
