"""The hostile HTML corpus (tests/data/hostile.html) as mails, for the sanitiser and browser tests."""

from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "hostile.html"


def bodies(listener: str) -> list[str]:
    """Each hostile body with {L} set to the listener's base URL (http://127.0.0.1:PORT)."""
    text = CORPUS.read_text().split("-->", 1)[1]
    host = listener.split("://", 1)[1]
    return [b.strip().replace("{L}", listener).replace("{H}", host) for b in text.split("\n----\n")]


def as_mail(n: int, body: str, to: str = "alice@example.com") -> bytes:
    return (
        f"From: Mallory <mallory@remote.test>\r\nTo: {to}\r\nSubject: hostile {n}\r\n"
        f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <hostile{n}@remote.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"<html><head></head><body>{body}</body></html>\r\n"
    ).encode()
