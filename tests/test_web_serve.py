"""The webmail served for real: `fallback web` and `fallback up` run gunicorn, and stop it by PID."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import ROOT, free_port, stop_pid
from tests.webutil import SECRET

pytestmark = pytest.mark.slow


def fallback(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FALLBACK_")}
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "fallback", *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_line(proc: subprocess.Popen[str], needle: str, limit: int = 200) -> list[str]:
    """Read output lines until one contains `needle` (bounded by `limit` lines)."""
    lines: list[str] = []
    assert proc.stdout is not None
    for _ in range(limit):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not in output:\n{''.join(lines)}")


def get(port: int, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def gunicorn_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_fallback_web_refuses_without_secret(redis_url: str, r) -> None:
    proc = fallback("web", "--redis-url", redis_url, "--http-port", str(free_port()))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fallback web: secret_key: the webmail needs a secret key")
    proc = fallback("web", "--redis-url", redis_url, "--http-port", str(free_port()),
                    env={"FALLBACK_SECRET_KEY": "change-me"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "secret_key" in out and "Traceback" not in out


def test_fallback_web_serves_and_stops(redis_url: str, r) -> None:
    port = free_port()
    proc = fallback("web", "--redis-url", redis_url, "--http-port", str(port), "--web-workers", "1",
                    env={"FALLBACK_SECRET_KEY": SECRET})
    try:
        lines = wait_line(proc, "fallback: ready")
        assert any(f"webmail on http://127.0.0.1:{port}/" in x for x in lines)
        assert get(port, "/healthz").status == 200
        login = get(port, "/login")
        assert login.status == 200
        assert "Secure" in (login.getheader("Set-Cookie") or "")  # the default: HTTPS-only cookies
        children = gunicorn_children(proc.pid)
        assert children
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    for pid in children:  # gunicorn was stopped, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_fallback_up_demo_serves_webmail(tmp_path: Path) -> None:
    port = free_port()
    proc = fallback("up", "--demo", "--data-dir", str(tmp_path / "data"), "--smtp-port", "0",
                    "--http-port", str(port), "--web-workers", "1")
    try:
        lines = wait_line(proc, "fallback: ready")
        text = "".join(lines)
        assert f"webmail on http://127.0.0.1:{port}/" in text and "demo@example.com" in text
        assert get(port, "/healthz").status == 200
        login = get(port, "/login")
        # Demo mode on plain local HTTP: the cookie must work without HTTPS.
        assert "Secure" not in (login.getheader("Set-Cookie") or "")
        assert get(port, "/status").status == 200
    finally:
        stop_pid(proc, timeout=60)  # type: ignore[arg-type]
    assert proc.returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # bounded: the port is free once gunicorn has gone
        try:
            get(port, "/healthz")
        except OSError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the webmail still answers after `fallback up` stopped")


def test_settings_round_trip_through_the_environment(settings, tmp_path: Path) -> None:
    """gunicorn's workers load the settings from FALLBACK_* variables: every field must survive."""
    from dataclasses import replace as dc_replace

    from fallback.config import load_settings, settings_env

    s = dc_replace(settings, secret_key=SECRET, cookie_secure=False, session_idle_timeout=90.0,
                   max_upload_size=3 * 1024 * 1024, incident_message="Down since 9:00, ETA noon",
                   web_workers=3, demo=True)
    assert load_settings({}, env=settings_env(s)) == s
