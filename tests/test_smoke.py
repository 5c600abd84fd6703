"""The shortest path through the product: provision, SMTP in, export out."""

from __future__ import annotations

import smtplib
from pathlib import Path

from fallback.cli import main


def test_mail_in_and_export(receiver, r, settings, tmp_path: Path, capsys) -> None:
    raw = b"From: a@remote.test\r\nTo: alice@example.com\r\nSubject: hello\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", receiver.port) as client:
        client.sendmail("a@remote.test", ["alice@example.com"], raw)
    out = tmp_path / "md"
    rc = main(["export", "alice@example.com", "--format", "maildir", "--output", str(out),
               "--redis-url", settings.redis_url])
    assert rc == 0
    files = list((out / "cur").iterdir())
    assert len(files) == 1
    stored = files[0].read_bytes()
    assert stored.endswith(raw)
    assert stored.startswith(b"Received: from ")
