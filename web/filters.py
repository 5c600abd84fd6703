"""Jinja filters for the mailbox pages: sizes, dates and senders the way people read them."""

from __future__ import annotations

import re
import time

from flask import Flask


def human_size(value: str | int) -> str:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return ""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def short_date(ts_ms: str | int, now: float | None = None) -> str:
    """Time of day for today's mail, day and month for this year's, else the full date (UTC)."""
    try:
        ts = int(ts_ms) / 1000
    except (TypeError, ValueError):
        return ""
    now = time.time() if now is None else now
    t, today = time.gmtime(ts), time.gmtime(now)
    if t[:3] == today[:3]:
        return time.strftime("%H:%M", t)
    if t.tm_year == today.tm_year:
        return time.strftime("%d %b", t)
    return time.strftime("%Y-%m-%d", t)


def full_date(ts_ms: str | int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(ts_ms) / 1000))
    except (TypeError, ValueError):
        return ""


_NAME_ADDR = re.compile(r'^\s*"?([^"<]*?)"?\s*<([^<>]*)>\s*$')


def sender_name(value: str) -> str:
    """'Ann Example <ann@x.org>' -> 'Ann Example'; a bare address stays as it is.

    A regex rather than email.utils.parseaddr: this runs for every row of every
    folder page, and parseaddr costs as much as the rest of the row.
    """
    m = _NAME_ADDR.match(value or "")
    if m:
        return m.group(1).strip() or m.group(2).strip() or "(no sender)"
    return (value or "").strip() or "(no sender)"


def epoch(value: object) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(str(value))))
    except (TypeError, ValueError):
        return ""


def install(app: Flask) -> None:
    app.add_template_filter(human_size, "size")
    app.add_template_filter(short_date, "shortdate")
    app.add_template_filter(full_date, "fulldate")
    app.add_template_filter(sender_name, "sender")
    app.add_template_filter(epoch, "epoch")
