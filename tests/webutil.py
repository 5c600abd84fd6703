"""Helpers for the webmail tests: an app on the test Redis, sessions, forms, messages.

The app is the real one (create_app) on the real session redis-server; a
session made here goes through the same SessionStore a log-in uses.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import redis
from flask import Flask
from flask.testing import FlaskClient

from fallback.config import Settings
from fallback.ids import new_id
from fallback.mailbox import delivery, directory, fields
from fallback.webserver import WebComponent
from tests.servers import free_port
from web import create_app
from web.sessions import COOKIE

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


@contextmanager
def served(settings: Settings, **overrides: Any) -> Iterator[str]:
    """gunicorn serving the webmail as `fallback up` runs it, on a free port: its base URL."""
    s = replace(settings, secret_key=SECRET, http_port=free_port(), cookie_secure=False, web_workers=1,
                web_threads=4, **overrides)
    component = WebComponent(s, s.redis_url or "")
    component.start_sync()
    try:
        yield f"http://127.0.0.1:{component.port}"
    finally:
        component.stop_sync()


def make_app(settings: Settings, r: redis.Redis, **overrides: Any) -> Flask:
    s = replace(settings, secret_key=SECRET, **overrides)
    app = create_app(s, r)
    app.config["TESTING"] = True
    return app


def log_in_as(client: FlaskClient, address: str) -> str:
    """A real session for `address` (as a log-in makes one); returns its CSRF token."""
    app = client.application
    with app.app_context():
        session = app.extensions["fallback"].sessions.create(address)
    client.set_cookie(COOKIE, session.token)
    return session.csrf


def csrf(html: str) -> str:
    m = _CSRF.search(html)
    assert m, "no csrf_token in the page"
    return m.group(1)


def field(html: str, name: str) -> str:
    m = re.search(rf'name="{name}"[^>]*?value="([^"]*)"', html)
    assert m, f"no field {name}"
    return m.group(1)


def put_message(r: redis.Redis, address: str, raw: bytes, folder: str = fields.INBOX,
                flags: tuple[str, ...] = (), kind: str = "received") -> str:
    """Deliver a message the way the receiver does (delivery.deliver), returning its id.

    Waits for the next millisecond first, so messages put one after another sort
    newest first (the folder index's score is the delivery time in ms).
    """
    start = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == start:  # bounded: at most one millisecond
        pass
    msg_id = new_id()
    delivery.deliver(r, [delivery.Delivery(address, directory.DEFAULT_MAILSTORE, folder, flags, kind)],
                  msg_id, raw)
    return msg_id


def simple(subject: str = "hello", sender: str = "ann@remote.test", to: str = "alice@example.com",
           body: str = "Hi there", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n"
            f"{extra}\r\n{body}\r\n").encode()
