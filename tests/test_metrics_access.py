"""/metrics and /readyz answer this machine and holders of the metrics token, nobody else;
/healthz and /status stay public (test client on the real Redis, and gunicorn over real sockets)."""

from __future__ import annotations

import http.client
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fallback.config import load_settings
from fallback.errors import ConfigError
from fallback.webserver import WebComponent
from tests.servers import free_port
from tests.webutil import SECRET, make_app

TOKEN = "metrics-token-0123456789abcdef"
FORBIDDEN = ("Forbidden: /metrics and /readyz answer this machine (loopback) and holders of the "
             "metrics token (Authorization: Bearer, see metrics_token_file).\n")
OUTSIDE = ("192.0.2.7", "2001:db8::7", "::ffff:192.0.2.7", "10.0.0.1", "")
LOOPBACK = ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.1")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "metrics.token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def monitored(settings, r, mailboxes, token_file) -> Any:
    return make_app(settings, r, metrics_token_file=token_file).test_client()


def get(client: Any, path: str, addr: str, **headers: str) -> Any:
    return client.get(path, environ_base={"REMOTE_ADDR": addr}, headers=headers)


def test_loopback_clients_are_answered(monitored) -> None:
    for addr in LOOPBACK:
        assert get(monitored, "/readyz", addr).text == "ready\n", addr
        metrics = get(monitored, "/metrics", addr)
        assert metrics.status_code == 200 and "fallback_" in metrics.text, addr


def test_other_clients_get_403_with_a_short_text(monitored) -> None:
    for addr in OUTSIDE:
        for path in ("/metrics", "/readyz"):
            response = get(monitored, path, addr)
            assert response.status_code == 403, (addr, path)
            assert response.text == FORBIDDEN and response.mimetype == "text/plain"
            assert "fallback_" not in response.text


def test_the_right_token_is_answered_anywhere_a_wrong_one_is_not(monitored) -> None:
    for path in ("/metrics", "/readyz"):
        ok = get(monitored, path, "192.0.2.7", Authorization=f"Bearer {TOKEN}")
        assert ok.status_code == 200, path
        assert get(monitored, path, "2001:db8::7", Authorization=f"bearer  {TOKEN} ").status_code == 200
        for wrong in (f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN,
                      f"Bearer {TOKEN.upper()}", ""):
            response = get(monitored, path, "192.0.2.7", Authorization=wrong)
            assert response.status_code == 403 and response.text == FORBIDDEN, wrong


def test_without_a_token_file_no_token_opens_it(settings, r, mailboxes) -> None:
    client = make_app(settings, r).test_client()
    for given in (f"Bearer {TOKEN}", "Bearer None", "Bearer "):
        assert get(client, "/metrics", "192.0.2.7", Authorization=given).status_code == 403
    assert get(client, "/metrics", "127.0.0.1").status_code == 200


def test_forwarding_headers_cannot_fake_loopback(monitored) -> None:
    spoofs = ({"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"},
              {"Forwarded": "for=127.0.0.1"}, {"X-Forwarded-For": "::1, 127.0.0.1"})
    for headers in spoofs:
        assert get(monitored, "/metrics", "192.0.2.7", **headers).status_code == 403, headers
        # Through a reverse proxy on this machine the peer is loopback, but the request came
        # from elsewhere: it needs the token like any other outside client.
        assert get(monitored, "/metrics", "127.0.0.1", **headers).status_code == 403, headers
        assert get(monitored, "/readyz", "127.0.0.1", Authorization=f"Bearer {TOKEN}",
                   **headers).status_code == 200


def test_liveness_and_status_page_stay_public(monitored) -> None:
    for addr in OUTSIDE:
        assert get(monitored, "/healthz", addr).text == "ok\n"
        assert get(monitored, "/status", addr).status_code == 200
        assert get(monitored, "/login", addr).status_code == 200


def test_bad_token_files_stop_start_up_with_one_line(settings, r, tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(ConfigError) as exc:
        make_app(settings, r, metrics_token_file=short)
    assert exc.value.reason == (f"metrics_token_file: the token in {short} is too short "
                                "(8 characters, need 16)")
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as exc:
        load_settings({"metrics_token_file": str(missing)})
    assert exc.value.reason == f"metrics_token_file: {missing} is not a readable file"
    with pytest.raises(ConfigError) as exc:
        load_settings({"metrics_token_file": str(short)})
    assert "too short (8 characters, need 16)" in exc.value.reason


def _outside_address() -> str | None:
    """A non-loopback address of this machine (the source of a request to it), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def _request(host: str, port: int, path: str, source: str, **headers: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_real_sockets_under_gunicorn(settings, mailboxes, token_file) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to send from")
    s = replace(settings, secret_key=SECRET, http_port=free_port(), http_host="0.0.0.0",
                cookie_secure=False, web_workers=1, web_threads=2, metrics_token_file=token_file)
    component = WebComponent(s, s.redis_url or "")
    component.start_sync()
    try:
        port = component.port
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            status, text = _request("127.0.0.1", port, "/metrics", source)
            assert status == 200 and "fallback_" in text, source
        assert _request("127.0.0.1", port, "/readyz", "127.0.0.2") == (200, "ready\n")
        # From this machine's own outside address: not loopback.
        assert _request(outside, port, "/metrics", outside) == (403, FORBIDDEN)
        assert _request(outside, port, "/readyz", outside, **{"X-Forwarded-For": "127.0.0.1"}) == \
            (403, FORBIDDEN)
        assert _request(outside, port, "/metrics", outside, Authorization=f"Bearer {TOKEN}")[0] == 200
        assert _request(outside, port, "/healthz", outside) == (200, "ok\n")
        # A local proxy passing on a request from elsewhere.
        assert _request("127.0.0.1", port, "/metrics", "127.0.0.1",
                        **{"X-Forwarded-For": "198.51.100.4"}) == (403, FORBIDDEN)
    finally:
        component.stop_sync()
