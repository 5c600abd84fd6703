"""`fallback incident set|clear|show` and what the webmail shows: banner, login, /status.

The CLI runs as its own process (and in-process for the error texts); the webmail
is one app built before any change, so every change is seen without a restart.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from fallback import keys
from fallback.cli import main
from fallback.ops import audit, failover, incident
from fallback.redisconn import sync_client
from tests.servers import free_port, wait_for
from tests.webutil import log_in_as, make_app

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "Our main mail system is down. We are working on it."


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fallback", "incident", *args, "--redis-url", redis_url],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "USER": "ops-user"})


def shown(client: Any, path: str) -> str:
    return client.get(path).text


def incident_paragraph(page: str) -> str:
    m = re.search(r'<p class="incident">(.*?)</p>', page, re.S)
    assert m, "no incident text on the page"
    return m.group(1)


def banner(page: str) -> str | None:
    m = re.search(r'<div class="banner live" role="status"><strong>Service update:</strong> (.*?)</div>',
                  page, re.S)
    return m.group(1) if m else None


def test_set_show_clear_seen_by_the_running_webmail_and_audited(client, r, redis_url) -> None:
    log_in_as(client, "alice@example.com")
    assert incident_paragraph(shown(client, "/status")) == DEFAULT
    assert banner(shown(client, "/")) is None

    text = "Mail from before Monday is safe; we expect the main system back by 18:00 <UTC> & sooner."
    done = cli(redis_url, "set", text, "--actor", "jane")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("incident text set; users see it within 2 seconds: ")
    escaped = html.escape(text, quote=True)
    wait_for(lambda: escaped in shown(client, "/status"), timeout=10, what="the new text on /status")
    assert incident_paragraph(shown(client, "/status")) == escaped
    assert banner(shown(client, "/status")) is None   # in the page itself, not twice
    assert banner(shown(client, "/")) == escaped
    assert "<UTC>" not in shown(client, "/")
    client2 = client.application.test_client()
    assert incident_paragraph(shown(client2, "/login")) == escaped
    assert banner(shown(client2, "/login")) is None
    assert banner(shown(client, "/folder/trash")) == escaped

    done = cli(redis_url, "show")
    assert done.returncode == 0 and done.stdout.startswith(text + "\n(set ") and "by jane)" in done.stdout
    entry = audit.recent(r, 1)[0]
    assert (entry.action, entry.actor, entry.args, entry.outcome) == ("incident set", "jane", {"text": text},
                                                                      "ok")

    second = "Back at 20:00."
    assert cli(redis_url, "set", second).returncode == 0
    wait_for(lambda: banner(shown(client, "/")) == second, timeout=10, what="the second text")
    assert audit.recent(r, 1)[0].actor == "ops-user"   # $USER when no --actor

    done = cli(redis_url, "clear")
    assert done.returncode == 0
    assert done.stdout.strip() == "incident text cleared; users see the configured incident_message again"
    wait_for(lambda: banner(shown(client, "/")) is None, timeout=10, what="the banner gone")
    assert incident_paragraph(shown(client, "/status")) == DEFAULT
    assert audit.recent(r, 1)[0].action == "incident clear"
    assert cli(redis_url, "clear").stdout.strip() == "no live incident text was set; nothing changed"
    done = cli(redis_url, "show", "--format", "json")
    assert '"live": null' in done.stdout and DEFAULT in done.stdout


@pytest.mark.parametrize(("text", "error"), [
    ("x" * (incident.MAX_LENGTH + 1),
     f"the incident text has {incident.MAX_LENGTH + 1} characters; "
     f"at most {incident.MAX_LENGTH} are allowed"),
    ("first line\nsecond line",
     "the incident text has a control character (U+000A) at character 11; use plain text on one line"),
    ("bell\x07", "the incident text has a control character (U+0007) at character 5; use plain text "
                 "on one line"),
    ("abc\u202edef", "the incident text has a control character (U+202E) at character 4; use plain text "
                    "on one line"),
    ("   ", "the incident text is empty; use `fallback incident clear` to remove it"),
])
def test_bad_text_is_one_line_and_changes_nothing(r, redis_url, capsys, text: str, error: str) -> None:
    assert main(["incident", "set", "kept", "--redis-url", redis_url]) == 0
    entries = len(audit.recent(r, 100))
    capsys.readouterr()
    assert main(["incident", "set", text, "--redis-url", redis_url]) == 1
    err = capsys.readouterr().err
    assert err == f"fallback incident: {error}\n"
    live = incident.read(r)
    assert live is not None and live.text == "kept"
    assert len(audit.recent(r, 100)) == entries   # nothing audited for a refusal


def test_text_at_the_length_limit_and_a_real_process_refusal(r, redis_url) -> None:
    at_limit = "é" * incident.MAX_LENGTH
    assert cli(redis_url, "set", at_limit).returncode == 0
    live = incident.read(r)
    assert live is not None and live.text == at_limit
    done = cli(redis_url, "set", at_limit + "!")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"fallback incident: the incident text has {incident.MAX_LENGTH + 1} characters; "
        f"at most {incident.MAX_LENGTH} are allowed"]


def test_cache_reads_again_after_its_ttl(r) -> None:
    now = [100.0]
    cache = incident.IncidentCache(ttl=2.0, clock=lambda: now[0])
    assert cache.get(r) is None
    incident.set_text(r, "one", "t")
    assert cache.get(r) is None          # "none" is remembered too, for the ttl
    now[0] += 2.1
    assert cache.get(r).text == "one"    # type: ignore[union-attr]
    incident.set_text(r, "two", "t")
    now[0] += 1.9
    assert cache.get(r).text == "one"    # type: ignore[union-attr]
    now[0] += 0.2
    assert cache.get(r).text == "two"    # type: ignore[union-attr]


def test_status_page_says_since_when_and_the_scope_when_allowed(settings, r: redis.Redis,
                                                                mailboxes) -> None:
    closed = make_app(settings, r).test_client()
    assert "Not active: no failover has been declared." in shown(closed, "/status")
    failover.start(r, ["ms-east", "ms-west"], now=1_764_590_400.0)   # 2025-12-01 12:00 UTC
    app = make_app(settings, r)
    page = shown(app.test_client(), "/status")
    assert 'Active since <time datetime="2025-12-01T12:00:00+00:00">2025-12-01 12:00 UTC</time>.' in page
    assert "Affected mail systems" not in page and "ms-east" not in page
    open_app = make_app(settings, r, status_show_scope=True)
    assert "Affected mail systems: ms-east, ms-west." in shown(open_app.test_client(), "/status")
    failover.stop(r, ["ms-east", "ms-west"])
    later = make_app(settings, r, status_show_scope=True)
    page = shown(later.test_client(), "/status")
    assert "Not active: no failover has been declared." in page and "Affected" not in page
    failover.start(r, None, now=1_764_594_000.0)
    page = shown(make_app(settings, r, status_show_scope=True).test_client(), "/status")
    assert "2025-12-01 13:00 UTC" in page and "Affected mail systems: all." in page


def test_status_page_answers_without_redis(settings, r) -> None:
    dead = sync_client(f"redis://127.0.0.1:{free_port()}/0")
    app = make_app(replace(settings), dead)
    response = app.test_client().get("/status")
    assert response.status_code == 200 and "Traceback" not in response.text
    assert "Since when it is active cannot be read right now." in response.text
    assert incident_paragraph(response.text) == DEFAULT
    assert r.exists(keys.INCIDENT) == 0
