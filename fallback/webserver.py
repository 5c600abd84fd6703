"""Running the webmail under gunicorn, as a child process of `fallback up` or `fallback web`.

The webmail itself lives in the `web` package, which imports `fallback`;
this module never imports it back: it starts gunicorn on the module path
`web.wsgi:app` and hands it the settings as FALLBACK_* variables.  The secret
key is checked here first, so a missing or default one stops start-up with
one line instead of a worker traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from fallback.config import Settings, settings_env, webmail_secret
from fallback.embedded import free_port
from fallback.errors import ConfigError

WSGI_APP = "web.wsgi:app"


def gunicorn_args(settings: Settings, port: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"{settings.http_host}:{port}",
        "--workers", str(settings.web_workers),
        # Threads: a request waiting on a slow password check does not hold up the others.
        "--worker-class", "gthread", "--threads", str(settings.web_threads),
        "--timeout", "60", "--graceful-timeout", "10",
        "--log-level", settings.log_level.lower(),
        *_no_control_socket(),
        WSGI_APP,
    ]


def _no_control_socket() -> list[str]:
    """Newer gunicorn opens a control socket at one fixed path per user; several instances
    (tests, benchmarks, scaled-out webmails on one host) would fight over it, and we do not use it."""
    from gunicorn.config import KNOWN_SETTINGS

    names = {s.name for s in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


def web_settings(settings: Settings, redis_url: str) -> Settings:
    """The settings the webmail runs with: a concrete Redis URL and, in demo mode, a made-up secret."""
    settings = replace(settings, redis_url=redis_url)
    if settings.demo and settings.secret_key is None and settings.secret_key_file is None:
        settings = replace(settings, secret_key=secrets.token_urlsafe(48))
    webmail_secret(settings)  # raises ConfigError: refuse before starting anything
    return settings


@dataclass
class WebComponent:
    settings: Settings
    redis_url: str
    name: str = "web"
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start_sync(self, timeout: float = 60.0) -> str:
        settings = web_settings(self.settings, self.redis_url)
        self.port = settings.http_port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FALLBACK_")}
        env.update(settings_env(replace(settings, http_port=self.port)))
        self.process = subprocess.Popen(gunicorn_args(settings, self.port), env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_healthy(timeout)
        host = settings.http_host if settings.http_host not in ("0.0.0.0", "::") else "localhost"  # noqa: S104
        return f"webmail on http://{host}:{self.port}/ (gunicorn, {settings.web_workers} workers)"

    def _wait_healthy(self, timeout: float) -> None:
        assert self.process is not None
        host = "127.0.0.1" if self.settings.http_host in ("0.0.0.0", "") else self.settings.http_host  # noqa: S104
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"the webmail (gunicorn) exited with {self.process.returncode} "
                                  "at start; see the lines above")
            conn = http.client.HTTPConnection(host.strip("[]"), self.port, timeout=2)
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            conn.close()
            time.sleep(0.1)
        self.stop_sync()
        raise ConfigError(f"the webmail did not answer on port {self.port} within {timeout:.0f}s")

    def stop_sync(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM: gunicorn finishes the requests in flight, then exits.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def start(self) -> str:
        return await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)
