"""The mailstore watcher (`fallback watch`) against real Dovecots, one per mailstore.

Each watcher runs as a real `fallback watch` process, stopped with SIGTERM
(which must end it with exit 0).  Waits are bounded polls: a failover must
come within interval x fail-after plus a generous margin, never timed to the
second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback.cli import main
from fallback.commands.check import CRITICAL, WARNING, evaluate
from fallback.commands.context import Context
from fallback.config import Settings
from fallback.mailbox.directory import Directory, Mailbox, ensure_buckets
from fallback.ops import audit, failover, metrics, probe, watch
from fallback.queues import outbound
from fallback.redisconn import async_client
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer
from tests.servers import ROOT, wait_for

INTERVAL, FAIL_AFTER = 0.5, 2
# interval x fail-after, plus the slow-after of the failing probes, plus room for a loaded machine.
FAILOVER_BOUND = INTERVAL * FAIL_AFTER + 15
URL = "https://webmail.example.com/"


def provision(r: redis.Redis, settings: Settings) -> None:
    d = Directory(r, ensure_buckets(r, settings.directory_buckets))
    for store in ("a", "b"):
        d.put(Mailbox(f"probe@{store}.example", store, "{PLAIN}x"))
        d.put(Mailbox(f"user@{store}.example", store, "{PLAIN}x", f"user.{store}@home.example"))


@pytest.fixture
def stores(r: redis.Redis, settings: Settings,
           dovecot_factory: Callable[..., DovecotServer]) -> dict[str, DovecotServer]:
    provision(r, settings)
    return {s: dovecot_factory([f"probe@{s}.example", f"user@{s}.example"]) for s in ("a", "b")}


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "master-password"
    path.write_text(MASTER_PASSWORD + "\n")
    return path


def target(name: str, server: DovecotServer) -> str:
    return f"{name}=imap://127.0.0.1:{server.port}/probe@{name}.example"


class Watchers:
    """`fallback watch` processes; each is SIGTERMed at the end and must exit 0 promptly."""

    def __init__(self, redis_url: str, tmp_path: Path) -> None:
        self.redis_url, self.tmp_path = redis_url, tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *argv: str, watcher_id: str = "w1") -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"{watcher_id}.log"
        env = {**os.environ, "FALLBACK_METRICS_FLUSH_INTERVAL": "0.5"}
        env.pop("FALLBACK_CONFIG", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fallback", "watch", "--redis-url", self.redis_url,
             "--master-user", MASTER_USER, "--interval", f"{INTERVAL}s", "--fail-after", str(FAIL_AFTER),
             "--slow-after", "1s", "--watcher-id", watcher_id, "--mail-log", str(log), *argv],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def mail_log(self, watcher_id: str = "w1") -> str:
        path = self.tmp_path / f"{watcher_id}.log"
        return path.read_text() if path.exists() else ""

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("fallback watch did not stop within 15 s of SIGTERM") from None


@pytest.fixture
def watchers(redis_url: str, tmp_path: Path) -> Iterator[Watchers]:
    w = Watchers(redis_url, tmp_path)
    yield w
    for proc in w.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def record(r: redis.Redis, name: str) -> watch.Record | None:
    return next((rec for rec in watch.records(r) if rec.mailstore == name), None)


def rounds_seen(r: redis.Redis, name: str, after: float) -> Callable[[], Any]:
    return lambda: (rec := record(r, name)) is not None and rec.at > after and rec


def probed_ok(r: redis.Redis, name: str) -> Callable[[], bool]:
    return lambda: (rec := record(r, name)) is not None and rec.up


def descendants(pid: int) -> list[int]:
    """The process and all its children (Dovecot's login, auth and imap processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return found


def verdict(settings: Settings, r: redis.Redis) -> tuple[int, str]:
    v = evaluate(r, Context(settings), allow_no_aof=True)
    return v.state, v.line()


# --- bad flags and targets: one line, exit non-zero, nothing started ------------------------


@pytest.mark.parametrize("argv, message", [
    (["--target", "a=http://127.0.0.1:143/probe@a.example"],
     "target a: bad URL 'http://127.0.0.1:143/probe@a.example': the scheme must be imap:// or imaps://"),
    (["--target", "a=imap://127.0.0.1:143/"],
     "target a: bad URL 'imap://127.0.0.1:143/': give the probe user as the path "
     "(NAME=imap://HOST:PORT/PROBE_USER (or imaps://))"),
    (["--target", "a=imap://127.0.0.1:99999/probe@a.example"],
     "target a: bad URL 'imap://127.0.0.1:99999/probe@a.example' (Port out of range 0-65535); "
     "expected NAME=imap://HOST:PORT/PROBE_USER (or imaps://)"),
    (["--target", "imap://127.0.0.1:143/probe@a.example"],
     "target 'imap://127.0.0.1:143/probe@a.example': expected NAME=imap://HOST:PORT/PROBE_USER "
     "(or imaps://)"),
    (["--target", "zz=imap://127.0.0.1:143/probe@a.example"],
     "unknown mailstore(s): zz (provisioned: a, b)"),
    (["--target", "a=imap://127.0.0.1:143/p@a.example", "--target", "a=imap://127.0.0.1:144/p@a.example"],
     "mailstore named by two targets: a"),
    ([], "no mailstore to watch: give --target NAME=imap://HOST:PORT/PROBE_USER (or imaps://) "
         "(or the watch_targets setting)"),
    (["--target", "a=imap://127.0.0.1:143/probe@a.example", "--fail-after", "0"],
     "--fail-after: must be 1 or more"),
    (["--target", "a=imap://127.0.0.1:143/probe@a.example", "--imap-ca-file", "/nonexistent/ca.pem"],
     "--imap-ca-file: cannot use /nonexistent/ca.pem: [Errno 2] No such file or directory"),
    (["--target", "a=imap://127.0.0.1:143/probe@a.example", "--notify"],
     "--notify needs the webmail URL users should open: --webmail-url URL (or FALLBACK_WEBMAIL_URL)"),
])
def test_bad_flags_and_targets_one_line(r: redis.Redis, settings: Settings, redis_url: str,
                                        password_file: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                        message: str) -> None:
    monkeypatch.delenv("FALLBACK_WATCH_TARGETS", raising=False)
    provision(r, settings)
    code = main(["watch", "--redis-url", redis_url, "--master-user", MASTER_USER,
                 "--master-password-file", str(password_file), *argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == f"fallback watch: {message}\n"
    assert not r.exists("failover:scope") and not watch.records(r)


def test_missing_password_file_and_master_user(r: redis.Redis, settings: Settings, redis_url: str,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings)
    spec = "a=imap://127.0.0.1:143/probe@a.example"
    missing = tmp_path / "nope"
    code = main(["watch", "--redis-url", redis_url, "--master-user", MASTER_USER,
                 "--master-password-file", str(missing), "--target", spec])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (f"fallback watch: --master-password-file: cannot read {missing}: [Errno 2] No such "
                   f"file or directory: '{missing}'\n")
    code = main(["watch", "--redis-url", redis_url, "--target", spec])
    assert code == 1
    assert capsys.readouterr().err == ("fallback watch: --master-user is required (the Dovecot master "
                                       "user the probes log in through)\n")


def test_targets_from_a_toml_table(r: redis.Redis, settings: Settings, redis_url: str,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    provision(r, settings)
    conf = tmp_path / "fallback.toml"
    conf.write_text('[watch_targets]\na = "imap://127.0.0.1:143/probe@a.example"\nb = "pop3://x/y"\n')
    code = main(["watch", "--config", str(conf), "--redis-url", redis_url, "--master-user", "m",
                 "--master-password-file", str(conf)])
    assert code == 1
    assert capsys.readouterr().err == ("fallback watch: target b: bad URL 'pop3://x/y': the scheme must "
                                       "be imap:// or imaps://\n")


# --- against real Dovecots ------------------------------------------------------------------


@pytest.mark.slow
def test_killed_mailstore_failed_over_once_by_two_watchers(
        r: redis.Redis, settings: Settings, stores: dict[str, DovecotServer], watchers: Watchers,
        password_file: Path) -> None:
    argv = ["--target", target("a", stores["a"]), "--target", target("b", stores["b"]),
            "--master-password-file", str(password_file), "--auto-failover", "--notify",
            "--webmail-url", URL]
    one, two = watchers.start(*argv, watcher_id="w1"), watchers.start(*argv, watcher_id="w2")
    for name in ("a", "b"):
        wait_for(probed_ok(r, name), 30, f"{name} probed ok")
    assert verdict(settings, r)[0] < CRITICAL
    assert not r.exists("failover:scope")

    stores["a"].stop()
    wait_for(lambda: watch.is_failed_over(failover.read(r), "a"), FAILOVER_BOUND, "a failed over")
    wait_for(lambda: audit.recent(r, 1), 15, "the audit entry")  # written after the notices
    # A few more rounds of both watchers: still one start, b never touched.
    seen = time.time()
    wait_for(lambda: all(rounds_seen(r, n, seen + 2 * INTERVAL)() for n in ("a", "b")), 30, "more rounds")
    scope = failover.read(r)
    assert scope.mode == failover.LISTED and set(scope.mailstores) == {"a"}
    starts = [e for e in audit.recent(r, 50) if e.action == "failover start"]
    assert len(starts) == 1, watchers.mail_log("w1") + watchers.mail_log("w2")
    entry = starts[0]
    assert entry.actor in ("watcher w1", "watcher w2")
    assert entry.args["mailstores"] == ["a"] and entry.args["notify"] is True
    # The failed probes of the episode, in order (reset or slow while Dovecot goes, then refused).
    probes = entry.args["reason"].split("; ")
    assert len(probes) == FAIL_AFTER
    assert all(p.startswith(("a refused: ", "a error: ", "a timeout: ")) for p in probes), probes
    assert entry.outcome.endswith("1 outage notice(s) queued; 1 user(s) without an alternate address "
                                  "skipped; 0 already told")
    notices = [list(item.record.rcpts) for item in outbound.scan(r) if item.record is not None]
    assert notices == [["user.a@home.example"]]  # b's user is not told

    a, b = record(r, "a"), record(r, "b")
    assert a is not None and b is not None
    assert 0 < r.ttl(watch.RECORD_PREFIX + "a") <= 60 and 0 < r.ttl(watch.RECORDS) <= 60  # expiring
    assert not a.up and a.failing and a.failures >= FAIL_AFTER and a.failed_over
    assert b.up and not b.failing and not b.failed_over and b.last_success is not None
    text = metrics.exposition(r).decode()
    assert 'fallback_mailstore_probe_up{mailstore="a"} 0.0' in text
    assert 'fallback_mailstore_probe_up{mailstore="b"} 1.0' in text
    assert 'fallback_mailstore_probe_failing{mailstore="a"} 1.0' in text
    for step in ("connect", "login", "select", "noop", "logout", "total"):
        assert f'fallback_mailstore_probe_seconds{{mailstore="b",step="{step}"}}' in text
    assert 'fallback_mailstore_probe_last_success_timestamp_seconds{mailstore="b"}' in text
    state, line = verdict(settings, r)
    assert state == CRITICAL and "mailstore a failing: " in line and "mailstore b" not in line
    logs = watchers.mail_log("w1") + watchers.mail_log("w2")
    assert 'event=alert reason="mailstore a failed 2 probes in a row (' in logs
    assert "mailstore b" not in logs

    for proc in (one, two):
        assert watchers.stop(proc) == 0


@pytest.mark.slow
def test_paused_mailstore_is_slow_then_looks_healthy_again(
        r: redis.Redis, settings: Settings, stores: dict[str, DovecotServer], watchers: Watchers,
        password_file: Path) -> None:
    proc = watchers.start("--target", target("a", stores["a"]), "--target", target("b", stores["b"]),
                          "--master-password-file", str(password_file), "--auto-failover",
                          "--healthy-after", "2s")
    wait_for(probed_ok(r, "a"), 30, "a probed ok")
    dovecot = stores["a"].proc
    assert dovecot is not None
    paused = descendants(dovecot.pid)
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: watch.is_failed_over(failover.read(r), "a"), FAILOVER_BOUND, "a failed over")
        a = record(r, "a")
        assert a is not None and a.kind == "timeout" and "did not answer within 1s" in a.reason
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    rec = wait_for(lambda: (x := record(r, "a")) is not None and x.healthy_again and x, 30,
                   "a looks healthy again")
    assert rec.up and rec.failed_over
    state, line = verdict(settings, r)
    assert state == WARNING and "mailstore a looks healthy again" in line
    assert 'fallback_mailstore_probe_healthy_again{mailstore="a"} 1.0' in metrics.exposition(r).decode()
    # Never an automatic stop, and b was never touched.
    time.sleep(3 * INTERVAL)  # a few more rounds of a healthy a
    assert set(failover.read(r).mailstores) == {"a"}
    assert [e.action for e in audit.recent(r, 50)] == ["failover start"]
    assert "mailstore a looks healthy again: every probe answered for" in watchers.mail_log()
    assert watchers.stop(proc) == 0


@pytest.mark.slow
def test_wrong_master_password_everywhere_alerts_and_fails_over_nothing(
        r: redis.Redis, settings: Settings, stores: dict[str, DovecotServer], watchers: Watchers,
        tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-master-password\n")
    proc = watchers.start("--target", target("a", stores["a"]), "--target", target("b", stores["b"]),
                          "--master-password-file", str(wrong), "--auto-failover")
    first = wait_for(lambda: (rec := record(r, "a")) is not None and rec, 30, "a probed")
    # Many more rounds than fail-after.
    wait_for(rounds_seen(r, "a", first.at + (FAIL_AFTER + 3) * INTERVAL), 30, "several rounds")
    for name in ("a", "b"):
        rec = record(r, name)
        # Refused, or (Dovecot's penalty for repeated failures) too slow to answer after a refusal.
        assert rec is not None and not rec.up and rec.kind in ("auth", "timeout") and not rec.failing
        assert rec.config_problem.startswith("watcher cannot probe any mailstore: every target refuses "
                                             "the master login (")
        assert rec.config_problem.endswith("check --master-user and --master-password-file; nothing is "
                                           "failed over")
    assert not r.exists("failover:scope") and not audit.recent(r, 5)
    state, line = verdict(settings, r)
    assert state == CRITICAL and "watcher cannot probe any mailstore" in line
    text = wait_for(lambda: (t := metrics.exposition(r).decode())
                    and 'fallback_mail_events_total{event="alert",outcome=""} 1.0' in t and t, 15,
                    "the alert counted")
    assert 'fallback_mailstore_probe_config_problem{mailstore="a"} 1.0' in text
    assert watchers.mail_log().count("event=alert") == 1  # once, not every round
    assert watchers.stop(proc) == 0


@pytest.mark.slow
def test_alert_only_and_an_unresolvable_target(
        r: redis.Redis, settings: Settings, stores: dict[str, DovecotServer], watchers: Watchers,
        password_file: Path) -> None:
    proc = watchers.start("--target", target("a", stores["a"]),
                          "--target", "b=imap://no-such-host.invalid:143/probe@b.example",
                          "--master-password-file", str(password_file))
    wait_for(probed_ok(r, "a"), 30, "a probed ok")
    stores["a"].stop()
    a = wait_for(lambda: (rec := record(r, "a")) is not None and rec.failing and rec, FAILOVER_BOUND,
                 "a failing")
    wait_for(rounds_seen(r, "a", a.at + 2 * INTERVAL), 30, "more rounds")
    assert not r.exists("failover:scope") and not audit.recent(r, 5)
    b = record(r, "b")
    assert b is not None and not b.failing and b.kind == "dns"
    assert b.config_problem.startswith("watcher cannot probe mailstore b: host no-such-host.invalid does "
                                       "not resolve")
    log = watchers.mail_log()
    assert 'reason="mailstore a failed 2 probes in a row (' in log
    assert "alert only: --auto-failover is off" in log
    assert "check its --target; it is not failed over" in log
    state, line = verdict(settings, r)
    assert state == CRITICAL and "mailstore a failing" in line and "not failed over" in line
    assert watchers.stop(proc) == 0  # within Watchers.stop's bound


def test_imaps_probe_checks_the_certificate(dovecot_factory: Callable[..., DovecotServer],
                                            tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    server = dovecot_factory(["probe@a.example"], tls=(cert, key))
    spec = probe.parse_target(f"a=imaps://127.0.0.1:{server.port}/probe@a.example")
    untrusted = asyncio.run(probe.probe(spec, MASTER_USER, MASTER_PASSWORD, slow_after=5,
                                        ssl_context=ssl.create_default_context()))
    assert untrusted.kind == probe.ERROR and "certificate verify failed" in untrusted.reason.lower()
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    good = asyncio.run(probe.probe(spec, MASTER_USER, MASTER_PASSWORD, slow_after=5, ssl_context=trusted))
    assert good.ok, good.describe()
    assert list(good.steps) == list(probe.STEPS)



def test_flapping_starts_one_failover_per_episode_and_never_stops_one(r: redis.Redis, settings: Settings,
                                                                       redis_url: str) -> None:
    """The decisions on a sequence of real probe results (real Redis, real failover scope)."""
    provision(r, settings)
    declared: list[tuple[str, str]] = []

    def declare(name: str, reason: str) -> None:
        declared.append((name, reason))
        failover.start(r, [name])

    alerts: list[str] = []

    class Log:
        def alert(self, msg_id: Any, rcpt: Any, *, reason: str) -> None:
            alerts.append(reason)

    targets = [probe.parse_target("a=imap://127.0.0.1:1/probe@a.example")]
    policy = watch.Policy(interval=1, fail_after=2, slow_after=1, healthy_after=10, auto_failover=True)

    async def walk() -> None:
        client = async_client(redis_url)
        w = watch.Watcher(client, targets, policy, master_user="m", master_password="p", declare=declare,
                          maillog=Log(), watcher_id="t")  # type: ignore[arg-type]
        clock = 1000.0

        async def step(kind: str) -> None:
            nonlocal clock
            clock += 1
            res = probe.Result("a", kind, "" if kind == probe.OK else "boom", {"connect": 0.01}, at=clock)
            await w.assess([res], await failover.read_async(client))

        await step(probe.ERROR)
        assert declared == []                  # one failure is not an outage
        await step(probe.OK)
        await step(probe.ERROR)
        assert declared == []                  # failures must be in a row
        await step(probe.ERROR)
        assert [n for n, _ in declared] == ["a"]
        for _ in range(5):                     # still failing: no second start
            await step(probe.TIMEOUT)
        assert len(declared) == 1
        for kind in [probe.OK] * 5 + [probe.SLOW] + [probe.OK] * 10:  # one slow probe restarts the period
            await step(kind)
            assert watch.is_failed_over(failover.read(r), "a")   # never stopped by the watcher
        assert not [a for a in alerts if "looks healthy again" in a]  # 9 s of answers: not yet 10
        for _ in range(3):
            await step(probe.OK)
        healthy = [a for a in alerts if "looks healthy again" in a]
        assert len(healthy) == 1 and "every probe answered for 10s" in healthy[0]  # at 10 s, once
        # The operator ends the failover while it still fails: left alone for this episode...
        await step(probe.ERROR)
        await step(probe.ERROR)
        failover.stop(r, ["a"], known=["a", "b"])
        for _ in range(3):
            await step(probe.ERROR)
        assert len(declared) == 1 and not watch.is_failed_over(failover.read(r), "a")
        # ... and a new episode after it answered again is a new start.
        await step(probe.OK)
        await step(probe.ERROR)
        await step(probe.ERROR)
        assert [n for n, _ in declared] == ["a", "a"]
        await client.aclose()

    r.delete(watch.CLAIM_PREFIX + "a")
    asyncio.run(walk())
