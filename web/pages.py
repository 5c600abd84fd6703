"""Public pages: /status (the operator's incident message) and /healthz (Redis answers)."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Response, render_template

from web.context import state

bp = Blueprint("pages", __name__)


@bp.get("/status")
def status() -> Any:
    return render_template("status.html")


@bp.get("/healthz")
def healthz() -> Any:
    try:
        state().r.ping()
    except (redis.RedisError, OSError):
        return Response("redis not answering\n", status=503, mimetype="text/plain")
    return Response("ok\n", mimetype="text/plain")
