"""Issue 18: from a mailstore's death to its users' first log-in and first stored mail, with the
watcher deciding, and N provisioned users (default 1,000,000).

A fresh redis-server configured like the embedded one; `fallback provision`
of N fake-bcrypt mailboxes on store0..store3 (bench/provision.py's CSV) plus
one user of store0 with a real password; `fallback failover stop --all` (no
mailstore failed over: every user's mail goes to the main system); a private
Dovecot as store0's IMAP with a probe user; `fallback smtp` and `fallback
web` (gunicorn) as subprocesses; `fallback watch --interval 1s --fail-after
3 --auto-failover` on store0.  Once the watcher has seen store0 healthy,
Dovecot is killed (SIGKILL of its processes, as a crash) and the clock
starts.  Then three pollers at once (bounded): when the scope covers store0
(the watcher's `failover start`, read from Redis every 0.05 s), when the
store0 user's HTTP POST /login (one every 0.1 s after the last answer)
first gets the inbox (302) instead of "your mailbox works normally", and
when a message sent with smtplib to that user (one every 0.25 s until
then) is first stored in their fallback INBOX.

    nice .venv/bin/python bench/watch_failover.py             # 1,000,000 users
    .venv/bin/python bench/watch_failover.py -n 10000         # a quick run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provision import write_csv  # noqa: E402
from fallback.config import load_settings  # noqa: E402
from fallback.mailbox import directory, passwords  # noqa: E402
from fallback.mailbox.store import MailboxReader  # noqa: E402
from fallback.ops import audit, failover, watch  # noqa: E402
from tests.dovecot import MASTER_PASSWORD, MASTER_USER, DovecotServer, new_workdir  # noqa: E402
from tests.servers import RedisServer, free_port, stop_pid, wait_port  # noqa: E402

USER, PASSWORD = "live@d0.example.com", "live-password-1"
PROBE = "probe@d0.example.com"
CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
BOUND = 120.0  # seconds: every wait below gives up after this


def fallback(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fallback", *argv]


def log_in(port: int) -> int:
    """One log-in through HTTP, as a browser does it: GET the form, POST it with its cookie."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/login")
        page = conn.getresponse()
        html = page.read().decode()
        cookie = "; ".join(c.split(";", 1)[0] for c in page.headers.get_all("Set-Cookie") or [])
        token = CSRF.search(html)
        body = urllib.parse.urlencode({"username": USER, "password": PASSWORD,
                                       "csrf_token": token.group(1) if token else ""})
        conn.request("POST", "/login", body=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie})
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


def send(port: int, n: int) -> str:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "ann@remote.example", USER, f"are you there {n}"
    msg.set_content("Hello.\n")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.send_message(msg)
        return "250"
    except smtplib.SMTPException as exc:
        return str(exc)[:80]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="provisioned mailboxes")
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    redis_server = RedisServer(work / "redis").start()
    url = redis_server.url
    dovecot = DovecotServer(new_workdir())
    dovecot.users = {PROBE: "", USER: ""}
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "FALLBACK_REDIS_URL": url, "FALLBACK_SECRET_KEY": "b" * 40,
           "FALLBACK_DATA_DIR": str(work / "data"), "FALLBACK_COOKIE_SECURE": "false"}
    env.pop("FALLBACK_CONFIG", None)
    out: dict[str, object] = {"mailboxes": opts.n}
    try:
        csv_path = work / "users.csv"
        write_csv(csv_path, opts.n)
        started = time.monotonic()
        subprocess.run(fallback("provision", str(csv_path)), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        out["provision_s"] = round(time.monotonic() - started, 1)
        settings = load_settings({"redis_url": url}, env={})
        from fallback.redisconn import sync_client

        r = sync_client(url)
        d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
        for address in (USER, PROBE):
            d.put(directory.Mailbox(address, "store0", passwords.hash_password(PASSWORD, "SHA512-CRYPT")))
        subprocess.run(fallback("failover", "stop", "--all", "--actor", "bench"), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        dovecot.start()
        smtp_port, http_port = free_port(), free_port()
        procs.append(subprocess.Popen(fallback("smtp", "--smtp-host", "127.0.0.1", "--smtp-port",
                                               str(smtp_port)), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(fallback("web", "--http-host", "127.0.0.1", "--http-port",
                                               str(http_port)), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        secret = work / "master-password"
        secret.write_text(MASTER_PASSWORD + "\n")
        procs.append(subprocess.Popen(fallback(
            "watch", "--target", f"store0=imap://127.0.0.1:{dovecot.port}/{PROBE}", "--master-user",
            MASTER_USER, "--master-password-file", str(secret), "--interval", "1s", "--fail-after", "3",
            "--auto-failover", "--mail-log", str(work / "watch.log")), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(smtp_port, timeout=60)
        wait_port(http_port, timeout=60)
        deadline = time.monotonic() + BOUND
        while not any(rec.up for rec in watch.records(r)):
            if time.monotonic() > deadline:
                raise SystemExit("the watcher never saw store0 healthy")
            time.sleep(0.1)
        assert log_in(http_port) == 200  # "your mailbox works normally": not failed over yet

        assert dovecot.proc is not None
        killed_at = time.monotonic()
        os.kill(dovecot.proc.pid, signal.SIGKILL)  # the master: its children see it gone and exit
        # Three pollers at once, as the users and senders would be: a log-in every 0.1 s, a
        # message every 0.25 s, and the scope read; each stops at its first success.
        found: dict[str, float] = {}
        counts = {"login_attempts": 0, "messages_sent": 0}

        def poll(name: str, step: Callable[[], bool], pause: float) -> None:
            while time.monotonic() - killed_at < BOUND:
                if step():
                    found[name] = time.monotonic() - killed_at
                    return
                time.sleep(pause)

        def login_step() -> bool:
            counts["login_attempts"] += 1
            began = time.monotonic()
            if log_in(http_port) in (302, 303):
                # The log-in's own time is mostly the password check (the hash's cost).
                found["successful_login_request_s"] = time.monotonic() - began
                found["successful_login_sent_s"] = began - killed_at
                return True
            return False

        reader = MailboxReader(r, USER)

        def mail_step() -> bool:
            if reader.count("INBOX") > 0:
                return True
            counts["messages_sent"] += 1
            send(smtp_port, counts["messages_sent"])
            return reader.count("INBOX") > 0

        pollers = [threading.Thread(target=poll, args=args) for args in (
            ("failed_over_s", lambda: watch.is_failed_over(failover.read(r), "store0"), 0.05),
            ("first_login_s", login_step, 0.1), ("first_mail_stored_s", mail_step, 0.25))]
        for t in pollers:
            t.start()
        for t in pollers:
            t.join(BOUND + 30)
        t_failover, t_login, t_mail = (found.get(k) for k in
                                       ("failed_over_s", "first_login_s", "first_mail_stored_s"))
        out.update({"failed_over_s": t_failover and round(t_failover, 2),
                    "first_login_s": t_login and round(t_login, 2),
                    "first_mail_stored_s": t_mail and round(t_mail, 2),
                    "successful_login_sent_s": round(found.get("successful_login_sent_s", -1), 2),
                    "successful_login_request_s": round(found.get("successful_login_request_s", -1), 2),
                    **counts})
        starts = [e for e in audit.recent(r, 10) if e.action == "failover start"]
        out["audit"] = {"actor": starts[0].actor, "reason": starts[0].args.get("reason")} if starts else None
        print(json.dumps(out, indent=2))
        return 0 if None not in (t_failover, t_login, t_mail) else 1
    finally:
        for proc in reversed(procs):
            stop_pid(proc)
        dovecot.stop()
        redis_server.stop()
        shutil.rmtree(dovecot.workdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
