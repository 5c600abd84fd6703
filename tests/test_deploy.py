"""The deploy kit and the runbook: what they name must exist and parse."""

from __future__ import annotations

import configparser
import contextlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fallback.cli import build_parser
from tests.servers import ROOT, free_port, postfix_env, postfix_tool, stop_pid, wait_port

SYSTEMD = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_services_volumes_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"redis", "smtp", "web", "worker"}
    redis = services["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--appendfsync always" in cmd and "--dir /data" in cmd
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    assert any(p.split(":")[0] == "25" for p in services["smtp"]["ports"])
    assert any(p.split(":")[0] == "8080" for p in services["web"]["ports"])
    for name in ("smtp", "web", "worker"):
        s = services[name]
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        assert s["environment"]["FALLBACK_REDIS_URL"] == "redis://redis:6379/0"
        assert s["restart"] == "unless-stopped"
    for name, s in services.items():
        assert s["healthcheck"]["test"][0] == "CMD", name


def test_compose_commands_are_real_subcommands(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name in ("smtp", "web", "worker"):
        args = parser.parse_args(compose["services"][name]["command"])
        assert args.command == name
    worker_check = compose["services"]["worker"]["healthcheck"]["test"]
    assert worker_check[1] == "fallback"
    assert parser.parse_args(worker_check[2:]).command == "check"


def test_compose_watch_is_opt_in(compose: dict[str, Any]) -> None:
    """Issue 18: the watcher starts only with its profile, in alert-only mode unless told."""
    watch = compose["services"]["watch"]
    assert watch["profiles"] == ["watch"]
    args = build_parser().parse_args(watch["command"])
    assert args.command == "watch" and args.watch_master_password_file == "/run/secrets/watch-master-password"
    env = watch["environment"]
    assert env["FALLBACK_WATCH_AUTO_FAILOVER"] == "${FALLBACK_WATCH_AUTO_FAILOVER:-false}"
    assert env["FALLBACK_REDIS_URL"] == "redis://redis:6379/0"


def test_compose_ports_match_the_commands(compose: dict[str, Any]) -> None:
    smtp = compose["services"]["smtp"]
    inner = smtp["command"][smtp["command"].index("--smtp-port") + 1]
    assert smtp["ports"] == [f"25:{inner}"]
    assert inner in " ".join(smtp["healthcheck"]["test"])
    web = compose["services"]["web"]
    inner = web["command"][web["command"].index("--http-port") + 1]
    assert web["ports"] == [f"8080:{inner}"] and f":{inner}/healthz" in " ".join(web["healthcheck"]["test"])


def test_dockerfile_installs_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fallback"]' in text and "pip install ." in text and "USER fallback" in text
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("unit", SYSTEMD, ids=lambda p: p.name)
def test_systemd_unit_runs_an_existing_subcommand(unit: Path) -> None:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(unit.read_text())
    service = cp["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/fallback")
    assert argv[1] == unit.stem.removeprefix("fallback-")
    result = subprocess.run([sys.executable, "-m", "fallback", *argv[1:], "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.startswith("usage: fallback"), result.stderr
    assert service["User"] == "fallback" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["EnvironmentFile"] == "/etc/fallback/fallback.env"


def test_systemd_units_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    for unit in SYSTEMD:
        result = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                                timeout=60, check=False)
        # The only complaint allowed is the install path that does not exist on a build machine.
        problems = [line for line in result.stderr.splitlines()
                    if line.strip() and "/opt/fallback/.venv/bin/fallback" not in line]
        assert problems == [], problems


def test_example_zone_loads() -> None:
    tool = shutil.which("named-checkzone")
    if tool is None:
        pytest.skip("named-checkzone is not installed")
    result = subprocess.run([tool, "example.com", str(ROOT / "deploy" / "dns" / "example.zone")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout


def test_postfix_transport_map_parses() -> None:
    entries = {}
    for line in (ROOT / "deploy" / "postfix" / "transport").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split()
            entries[key] = value
    assert entries["example.com"] == "smtp:[fallback.example.com]:25"
    snippet = (ROOT / "deploy" / "postfix" / "main.cf.snippet").read_text()
    assert "transport_maps = hash:/etc/postfix/transport" in snippet


def _postfix_conf(tmp_path: Path, extra: str = "") -> Path:
    """A throwaway Postfix config dir: just enough for postconf/postmap to run unprivileged."""
    (tmp_path / "main.cf").write_text("mail_owner = daemon\nsetgid_group = mail\ncompatibility_level = 3.6\n"
                                      + extra)
    (tmp_path / "master.cf").write_text("")
    return tmp_path


def test_postfix_reads_the_snippet_and_the_transport_map(tmp_path: Path) -> None:
    """Postfix's own tools (unpacked by install-deps.sh) accept the snippet and resolve the map."""
    try:
        postconf, postmap = postfix_tool("postconf"), postfix_tool("postmap")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    snippet = (ROOT / "deploy" / "postfix" / "main.cf.snippet").read_text()
    conf = _postfix_conf(tmp_path, snippet)
    result = subprocess.run([*postconf, "-c", str(conf), "-n"], capture_output=True, text=True,
                            env=postfix_env(), timeout=60, check=False)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    assert "transport_maps = hash:/etc/postfix/transport" in result.stdout
    table = f"texthash:{ROOT / 'deploy' / 'postfix' / 'transport'}"
    for domain, expected in (("example.com", "smtp:[fallback.example.com]:25"),
                             (".example.com", "smtp:[fallback.example.com]:25"), ("example.net", "")):
        result = subprocess.run([*postmap, "-c", str(conf), "-q", domain, table], capture_output=True,
                                text=True, env=postfix_env(), timeout=60, check=False)
        assert result.stdout.strip() == expected, (domain, result.stderr)
        assert result.returncode == (0 if expected else 1)


def test_smtp_subcommand_runs_only_the_receiver(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fallback", "smtp", "--redis-url", redis_url,
                             "--smtp-port", str(port), "--hostname", "fallback.test"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port)
        import smtplib

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            code, banner = client.ehlo("client.test")
            assert code == 250 and b"fallback.test" in banner
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
        stop_pid(proc)
    assert proc.returncode == 0, out
    assert "SMTP receiver on" in out and "webmail" not in out.lower() and "worker" not in out


def runbook_commands() -> list[str]:
    """Every `fallback ...` line inside the runbook's shell code blocks (continuations
    joined); ```text blocks show output, not commands."""
    text = (ROOT / "docs" / "runbook.md").read_text()
    commands = []
    block: list[str] | None = None
    shell = False
    for raw in text.splitlines():
        fence = re.fullmatch(r"\s*```(\w*)\s*", raw)
        if fence and block is None:
            block, shell = [], fence.group(1) in ("", "sh", "bash", "console")
            continue
        if fence and block is not None:
            if shell:
                for line in "\n".join(block).replace("\\\n", " ").splitlines():
                    line = line.strip().removeprefix("$ ")
                    if line.startswith("fallback "):
                        commands.append(line.split(" #")[0].split(" | ")[0].split(" > ")[0].strip())
            block = None
            continue
        if block is not None:
            block.append(raw)
    return commands


def test_runbook_has_commands() -> None:
    assert len(runbook_commands()) >= 15


@pytest.mark.parametrize("line", runbook_commands())
def test_runbook_command_parses(line: str) -> None:
    """Each command of the runbook exists with exactly those flags (parsed, not run)."""
    argv = shlex.split(line)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"runbook command does not parse ({exc.code}): {line}")
