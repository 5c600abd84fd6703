"""deploy/prometheus/fallback.rules.yml and deploy/grafana/fallback.json against promtool and a real /metrics.

promtool (Debian's `prometheus` package) checks the rules and runs their unit
tests (fallback.rules.test.yml); the dashboard's queries are checked by the same
parser.  Every metric the rules and the dashboard name must be one a real
/metrics exports after real traffic: mail through the real receiver (stored,
refused, forwarded), a message the real outbound worker hands to smtp-sink,
webmail log-ins.  Every alert links to a heading of docs/runbook.md that exists.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fallback.config import Settings
from fallback.mailbox import directory
from fallback.ops import failover, metrics
from fallback.queues import outbound
from fallback.service import Service
from tests.servers import SmtpSink, free_port, wait_for, wait_port
from tests.test_web_auth import login
from tests.webutil import make_app, simple

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "fallback.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "fallback.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fallback.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
# Groups of other components, whose figures exist only while their process runs (their own tests).
ELSEWHERE = {"fallback-mailstore-probes"}
METRIC = re.compile(r"(?<![\w:$])fallback_[a-z0-9_]+")
RECORDED = re.compile(r"(?<![\w$])fallback:[a-z0-9_:]+")

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool missing: deploy/install-deps.sh test")


def groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES.read_text())["groups"])


def ours() -> list[dict[str, Any]]:
    return [rule for g in groups() if g["name"] not in ELSEWHERE for rule in g["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def slugs(markdown: str) -> set[str]:
    """The anchors GitHub (and most Markdown renderers) give the headings."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[`*_]", "", m.group(1).strip().lower())
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


@needs_promtool
def test_promtool_checks_the_rules_and_runs_their_unit_tests(tmp_path: Path) -> None:
    assert promtool is not None
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=120, check=False)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout

    # The dashboard's queries, through the same parser (Grafana's variables given values).
    exprs = [e.replace("$__rate_interval", "5m").replace("$job", ".*") for e in dashboard_exprs()]
    as_rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": e} for n, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(as_rules))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboard.rules.yml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_alert_says_what_how_bad_and_where_the_runbook_is() -> None:
    anchors = slugs(RUNBOOK.read_text())
    alerts = [rule for g in groups() for rule in g["rules"] if "alert" in rule]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)) and len(ours()) > 10
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        notes = a["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), a["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page.endswith("docs/runbook.md") and anchor in anchors, (a["alert"], anchor)
    for a in (rule for rule in ours() if "alert" in rule):  # a watcher's verdicts are debounced already
        assert re.fullmatch(r"\d+[smh]", a.get("for", "")), a["alert"]
    # The families the issue asks for, each alerted on.
    exprs = " ".join(rule["expr"] for rule in ours())
    for family in ("fallback_redis_memory_reserve_bytes", "fallback_redis_aof_last_write_ok",
                   "fallback_redis_aof_last_bgrewrite_ok", "fallback_queue_oldest_age_seconds",
                   "fallback_queue_dead_letters", "fallback_queue_events_total", "fallback_mail_events_total",
                   "fallback_reconcile_messages", "fallback_webmail_responses_total",
                   "fallback_webmail_logins_total"):
        assert family in exprs, family


class ServiceThread:
    """`fallback up`'s runner (receiver and outbound worker, counting for /metrics) in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.service = Service(settings, roles=("smtp", "worker", "forward"))
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.stop_event = asyncio.Event()
            await self.service.run(self.stop_event)

        self.loop.run_until_complete(main())

    def stop(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    yield s
    s.cleanup()


def scrape(client: Any) -> set[str]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {s.name for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_every_metric_named_is_exported_after_real_traffic(settings: Settings, r: redis.Redis,
                                                           mailboxes: list[str], sink: SmtpSink) -> None:
    d = directory.Directory(r, directory.ensure_buckets(r, settings.directory_buckets))
    d.put(directory.Mailbox("bob@example.com", "healthy", d.get("bob@example.com").password_hash))
    failover.start(r, ["default"])  # bob's mail goes to the forward queue
    port = free_port()
    live = replace(settings, smtp_port=port, smtp_host="127.0.0.1", smtp_workers=1,
                   metrics_flush_interval=0.05, smarthost=f"127.0.0.1:{sink.port}", smarthost_tls="none",
                   forward_to=f"smtp://127.0.0.1:{sink.port}")
    service = ServiceThread(live)
    service.thread.start()
    try:
        wait_port(port, timeout=30)
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as s:
            s.sendmail("ann@remote.test", ["alice@example.com", "nobody@example.com"], simple())
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.3", 0)) as s:
            s.sendmail("ann@remote.test", ["bob@example.com"], simple(to="bob@example.com"))
        outbound.submit(r, sender="alice@example.com", mailstore="default", recipients=["x@remote.test"],
                        raw=simple(sender="alice@example.com", to="x@remote.test"),
                        msg_id="01TESTALERTRULES0000000000")
        # The workers' events, counted with the labels the rules select on.
        wanted = {(("event", "sent"), ("outcome", "250"), ("queue", "outbound")),
                  (("event", "forwarded"), ("outcome", "250"), ("queue", "forward"))}
        wait_for(lambda: wanted <= set(metrics.totals(r).get(metrics.QUEUE_EVENTS, {})),
                 what="the workers' sent and forwarded events counted")
        assert len(sink.messages()) == 2  # alice's to x@remote.test, bob's forwarded
    finally:
        service.stop()

    app = make_app(settings, r)
    client = app.test_client()
    assert login(client, "alice@example.com").status_code == 302
    assert login(app.test_client(), "carol@example.org", password="wrong").status_code == 401
    r.config_set("maxmemory", 1024 * 1024 * 1024)  # the reserve is a share of maxmemory
    try:
        exported = scrape(client)
    finally:
        r.config_set("maxmemory", 0)

    assert "fallback_queue_events_total" in exported and "fallback_webmail_responses_total" in exported
    rules = ours()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    named = {m for rule in rules for m in METRIC.findall(rule["expr"])}
    shown = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    assert named and shown
    assert named - exported == set(), "rules name metrics /metrics does not export"
    assert shown - exported == set(), "the dashboard names metrics /metrics does not export"
    used = {m for rule in rules for m in RECORDED.findall(rule["expr"])}
    used |= {m for e in dashboard_exprs() for m in RECORDED.findall(e)}
    assert used <= recorded, used - recorded
