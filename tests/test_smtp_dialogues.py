"""SMTP dialogue tables (tests/dialogues/*.txt) driven over raw sockets against the real receiver.

Format, one item a line (blank lines and `#` comments are skipped):

    C: <command or DATA line>   sent with CRLF; `<x*N>` expands to N times x
    S: <code>[ <enhanced>]     the reply's last line must start with this;
    S: <code>-<text>           ... or, with a dash, some line of it must
    S: <closed>                the server closed the connection
    @set name=value             receiver setting (fallback.config.Settings field)
    @provision a{1..N}@d        extra mailboxes;  `{a..b}` in a C: line repeats it with its S: line
    @redis unreachable|oom      Redis refuses connections / refuses writes (maxmemory, noeviction)
    @fail module.function       that function raises an exception with a secret text
    @forbid TEXT                no reply may contain TEXT (and never a 500)
    @stored ADDRESS N           after the dialogue, ADDRESS holds N messages
    @tls / @starttls            configure a certificate / switch the socket to TLS here
    @sleep SECONDS
"""

from __future__ import annotations

import re
import ssl
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from fallback.config import Settings
from fallback.config.load import _convert, _field_hints
from fallback.mailbox.store import MailboxReader
from fallback.redisconn import async_client, sync_client
from tests.conftest import add_mailbox
from tests.servers import RedisServer, free_port
from tests.smtpwire import Wire

DIALOGUES = Path(__file__).parent / "dialogues"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_REPEAT = re.compile(r"<(.)\*(\d+)>")


def _expand_steps(lines: list[str]) -> list[tuple[str, str]]:
    steps: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.startswith("#"):
            continue
        kind, _, rest = line.partition(": ") if line[:2] in ("C:", "S:") else ("@", "", line[1:])
        if kind == "C" and (m := _RANGE.search(rest)):
            reply = lines[i]
            i += 1
            for n in range(int(m.group(1)), int(m.group(2)) + 1):
                steps.append(("C", _RANGE.sub(str(n), rest)))
                steps.append(("S", reply[3:]))
            continue
        steps.append((kind[0] if kind != "@" else "@", rest if kind != "@" else line[1:]))
    return steps


def _setting(name: str, value: str) -> Any:
    field = {f.name: f for f in fields(Settings)}[name]
    return _convert(field, _field_hints()[name], value)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, trustme.CA]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        with open(d / "cert.pem", "ab") as fh:
            fh.write(pem.bytes())
    return d / "cert.pem", d / "key.pem", ca


@pytest.mark.parametrize("name", sorted(p.name for p in DIALOGUES.glob("*.txt")))
def test_dialogue(name: str, receiver_factory: Any, mailboxes: list[str], r: redis.Redis,
                  settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  tls_files: tuple[Path, Path, trustme.CA]) -> None:
    steps = _expand_steps((DIALOGUES / name).read_text().splitlines())
    overrides: dict[str, Any] = {}
    forbid: list[str] = []
    stored: list[tuple[str, int]] = []
    redis_mode = ""
    tls_client: ssl.SSLContext | None = None
    for kind, text in steps:
        if kind != "@":
            continue
        word, _, arg = text.partition(" ")
        if word == "set":
            key, _, value = arg.partition("=")
            overrides[key] = _setting(key, value)
        elif word == "provision":
            m = _RANGE.search(arg)
            assert m, arg
            for n in range(int(m.group(1)), int(m.group(2)) + 1):
                add_mailbox(r, settings, _RANGE.sub(str(n), arg), scheme="SHA256-CRYPT")
        elif word == "redis":
            redis_mode = arg
        elif word == "fail":
            module, _, func = arg.rpartition(".")

            async def boom(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("secret-exception-text")

            def boom_sync(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("secret-exception-text")

            import importlib

            target = importlib.import_module(module)
            original = getattr(target, func)
            import inspect

            monkeypatch.setattr(target, func, boom if inspect.iscoroutinefunction(original) else boom_sync)
        elif word == "forbid":
            forbid.append(arg)
        elif word == "stored":
            addr, _, count = arg.partition(" ")
            stored.append((addr, int(count)))
        elif word == "tls":
            cert, key, ca = tls_files
            overrides.update(tls_cert=cert, tls_key=key)
            tls_client = ssl.create_default_context()
            ca.configure_trust(tls_client)

    oom_server: RedisServer | None = None
    if redis_mode == "oom":
        # A Redis of its own that will answer reads and refuse every write.
        oom_server = RedisServer(tmp_path / "oom").start()
        oom = redis.Redis.from_url(oom_server.url)
        for addr in mailboxes:
            add_mailbox(oom, settings, addr)
        overrides["redis_url"] = oom_server.url
    rt = receiver_factory(**overrides)
    if redis_mode == "unreachable":
        rt.server.handler.r = async_client(f"redis://127.0.0.1:{free_port()}/0")
    elif oom_server is not None:
        oom.config_set("maxmemory", 1)

    wire = Wire(rt.port)
    replies: list[str] = []
    try:
        for kind, text in steps:
            if kind == "C":
                wire.cmd(_REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text).encode())
            elif kind == "S":
                if text == "<closed>":
                    assert wire.closed(), f"{name}: expected the server to close the connection"
                    continue
                got = wire.reply()
                assert got is not None, f"{name}: connection closed, expected {text!r}"
                replies.extend(got)
                if text[3:4] == "-":
                    want = text[:3] + " " + text[4:]
                    assert any(line.startswith((text, want)) for line in got), f"{name}: {text!r}, {got}"
                else:
                    assert got[-1].startswith(text), f"{name}: expected {text!r}, got {got}"
            elif text.startswith("sleep "):
                time.sleep(float(text.split()[1]))
            elif text == "starttls":
                assert tls_client is not None
                wire.starttls(tls_client)
    finally:
        wire.close()
        if oom_server is not None:
            oom.config_set("maxmemory", 0)
            oom.close()
    for line in replies:
        assert not line.startswith("500 Error: ("), f"{name}: aiosmtpd's default error reply: {line}"
        for text in forbid:
            assert text not in line, f"{name}: {text!r} leaked on the wire: {line}"
    check = sync_client(overrides.get("redis_url", settings.redis_url))
    for addr, count in stored:
        assert MailboxReader(check, addr).count("INBOX") == count, f"{name}: {addr}"
    check.close()
    if oom_server is not None:
        oom_server.stop()
