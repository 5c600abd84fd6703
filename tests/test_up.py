"""`fallback up` as a real process: embedded durable Redis, banner, other commands find it, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fallback import embedded, keys
from fallback.mailbox import fields
from tests.servers import free_port
from tests.smtpwire import Wire

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLBACK_")}
    env.update(extra)
    return env


class Up:
    """One `fallback up` process; reads its banner lines until `ready`."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        cmd = [sys.executable, "-m", "fallback", "up", "--data-dir", str(data_dir),
               "--smtp-port", "0", "--http-port", str(free_port()), "--hostname", "up.test", *args]
        # The webmail that `up` also starts wants a signing secret unless --demo.
        env = clean_env(FALLBACK_SECRET_KEY="test-secret-" + "k" * 40)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.banner: list[str] = []
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"fallback up exited: {self.proc.wait()} {self.proc.stderr.read()}")  # type: ignore[union-attr]
            self.banner.append(line.rstrip("\n"))
            if "ready" in line:
                break
        m = re.search(r"SMTP receiver on [\d.]+:(\d+)", "\n".join(self.banner))
        assert m, self.banner
        self.smtp_port = int(m.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"
    # Never leave an embedded redis-server behind, whatever the test did.
    try:
        pid = json.loads((tmp_path / "data" / embedded.STATE_FILE).read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fallback", *args], cwd=ROOT, env=env or clean_env(),
                          capture_output=True, text=True, timeout=60, check=False)


def test_up_embedded_redis_demo_status_export_and_sigterm(data_dir: Path, tmp_path: Path) -> None:
    up = Up(data_dir, "--demo")
    try:
        banner = "\n".join(up.banner)
        assert up.smtp_port != 0  # --smtp-port 0: the banner shows the port really bound
        assert "demo mailbox demo@example.com password demo" in banner
        url = embedded.find_url(data_dir)
        assert url is not None
        r = redis.Redis.from_url(url)
        config = {k: v for k, v in r.config_get("*").items()
                  if k in ("appendonly", "appendfsync", "maxmemory-policy", "hash-max-listpack-entries")}
        assert config == {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction",
                          "hash-max-listpack-entries": "1024"}
        assert Path(r.config_get("dir")["dir"]).resolve() == (data_dir / "redis").resolve()
        raw = b"From: me@remote.test\r\nSubject: hi\r\n\r\nhello demo\r\n"
        with smtplib.SMTP("127.0.0.1", up.smtp_port) as smtp:
            smtp.sendmail("me@remote.test", ["demo@example.com"], raw)

        # Other subcommands find the embedded Redis through --data-dir or FALLBACK_DATA_DIR.
        status = cli("status", "--format", "json", "--data-dir", str(data_dir))
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["mailstores"]["default"] == {"mailboxes": 1, "messages": 1,
                                                 "bytes": data["mailstores"]["default"]["bytes"]}
        assert data["mailstores"]["default"]["bytes"] > len(raw)
        assert data["redis"]["aof_enabled"] is True and data["redis"]["appendfsync"] == "always"
        assert data["redis"]["maxmemory_policy"] == "noeviction" and data["redis"]["used_memory"] > 0
        table = cli("status", env=clean_env(FALLBACK_DATA_DIR=str(data_dir)))
        assert table.returncode == 0 and "default" in table.stdout and "appendfsync always" in table.stdout
        out = tmp_path / "demo.maildir"
        exp = cli("export", "demo@example.com", "--format", "maildir", "--output", str(out),
                  env=clean_env(FALLBACK_DATA_DIR=str(data_dir)))
        assert exp.returncode == 0, exp.stderr
        [msg] = list((out / "cur").iterdir())
        assert msg.read_bytes().endswith(raw)
        # Without a running `fallback up` for the dir: one line saying what to do.
        lost = cli("status", "--data-dir", str(tmp_path / "elsewhere"))
        assert lost.returncode == 1 and "no Redis" in lost.stderr and "Traceback" not in lost.stderr

        # SIGTERM mid-transaction: the transaction finishes, then the rest get 421, Redis stops last.
        wire = Wire(up.smtp_port)
        wire.expect("220")
        for cmd, code in (("EHLO c", "250"), ("MAIL FROM:<a@remote.test>", "250"),
                          ("RCPT TO:<demo@example.com>", "250"), ("DATA", "354")):
            wire.cmd(cmd)
            wire.expect(code)
        wire.send(b"Subject: in flight\r\n\r\nhalf")
        idle = Wire(up.smtp_port)
        idle.expect("220")
        redis_pid = json.loads((data_dir / embedded.STATE_FILE).read_text())["pid"]
        up.proc.send_signal(signal.SIGTERM)
        assert idle.reply() is None or idle.closed()  # idle connections are closed at once
        with pytest.raises(OSError):
            for _ in range(50):  # stopped accepting
                Wire(up.smtp_port, timeout=1).expect("220")
                time.sleep(0.1)
        time.sleep(0.5)
        wire.send(b" done\r\n.\r\n")
        wire.expect("250 2.0.0")
        wire.expect("421 4.3.2")  # and only then is it told the service is going away
        assert wire.closed()
        code, stdout, stderr = up.stop()
        assert code == 0, stderr
        assert "Traceback" not in stderr
        assert "stopping" in stdout
        with pytest.raises(ProcessLookupError):
            os.kill(redis_pid, 0)
        assert not (data_dir / embedded.STATE_FILE).exists()
    finally:
        up.stop(signal.SIGKILL)

    # Everything that got 250 is there after a restart (the AOF was fsynced).  Still --demo:
    # a real start refuses while the demo mailbox is in its Redis (tests/test_demo_safety.py).
    again = Up(data_dir, "--demo")
    try:
        out = tmp_path / "again.mbox"
        exp = cli("export", "demo@example.com", "--output", str(out), "--data-dir", str(data_dir))
        assert exp.returncode == 0, exp.stderr
        from fallback.ops.export import iter_mbox

        bodies = list(iter_mbox(out))
        assert len(bodies) == 2
        assert bodies[0].endswith(raw) and bodies[1].endswith(b"Subject: in flight\r\n\r\nhalf done\r\n")
    finally:
        assert again.stop()[0] == 0


def test_second_up_on_the_same_data_dir_refuses(data_dir: Path) -> None:
    up = Up(data_dir)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "fallback", "up", "--data-dir", str(data_dir), "--smtp-port", "0",
             "--http-port", str(free_port())],
            cwd=ROOT, env=clean_env(FALLBACK_SECRET_KEY="test-secret-" + "k" * 40), capture_output=True,
            text=True, timeout=60, check=False)
        assert second.returncode == 1
        assert "already running" in second.stderr and "Traceback" not in second.stderr
    finally:
        assert up.stop(signal.SIGINT)[0] == 0


def test_up_workers_runs_receivers_and_webmail_workers_on_every_core(data_dir: Path) -> None:
    """--workers N: N receiver processes on one port and N gunicorn workers; all stop on SIGTERM."""
    up = Up(data_dir, "--workers", "2", "--demo")
    try:
        banner = "\n".join(up.banner)
        m = re.search(r"\(2 processes: (\d+), (\d+)\)", banner)
        assert m, banner
        assert "(gunicorn, 2 workers)" in banner
        for n in range(10):  # a fresh connection each: either process may take it
            with smtplib.SMTP("127.0.0.1", up.smtp_port) as smtp:
                smtp.sendmail("me@remote.test", ["demo@example.com"], f"Subject: {n}\r\n\r\nx\r\n".encode())
        url = embedded.find_url(data_dir)
        assert url is not None
        assert redis.Redis.from_url(url).zcard(keys.folder("demo@example.com", fields.INBOX)) == 10
        child = int(m.group(2))
    finally:
        code, _, err = up.stop()
    assert code == 0, err
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text().lower()
