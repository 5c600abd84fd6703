"""Public pages: /status (the operator's incident text, since when the service is active and,
when allowed, which mailstores) and /healthz (Redis answers); `live_incident` for every page.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import redis
from flask import Blueprint, Response, g, render_template

from fallback.ops import failover
from web.context import state

bp = Blueprint("pages", __name__)
log = logging.getLogger(__name__)


def live_incident() -> str:
    """The operator's live incident text ('' when none is set), read once per request through
    the app's short cache.  A Redis fault shows no live text rather than an error: the page
    that is being drawn may be the one saying that Redis is not answering."""
    if "incident_live" not in g:
        try:
            live = state().incident.get(state().r)
        except (redis.RedisError, OSError) as exc:
            log.warning("webmail: incident text not read: %s", exc)
            live = None
        g.incident_live = live.text if live else ""
    text: str = g.incident_live
    return text


def _active_since(scope: failover.Scope) -> float | None:
    """When the failover began: the declaration for everyone, or the earliest mailstore's."""
    if scope.mode == failover.ALL:
        return scope.since
    if scope.mode == failover.LISTED and scope.mailstores:
        return min(scope.mailstores.values())
    return None


def _utc(epoch: float) -> dict[str, str]:
    when = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return {"iso": when.isoformat(timespec="seconds"), "text": when.strftime("%Y-%m-%d %H:%M UTC")}


@bp.get("/status")
def status() -> Any:
    try:
        scope: failover.Scope | None = state().scope.get(state().r)
    except (redis.RedisError, OSError) as exc:  # the public page still answers, saying less
        log.warning("webmail: failover scope not read for /status: %s", exc)
        scope = None
    since = _active_since(scope) if scope is not None else None
    affected: list[str] | None = None
    if scope is not None and state().settings.status_show_scope and since is not None:
        affected = sorted(scope.mailstores) if scope.mode == failover.LISTED else []
    return render_template("status.html", active_since=_utc(since) if since is not None else None,
                           affected=affected, scope_known=scope is not None)


@bp.get("/healthz")
def healthz() -> Any:
    try:
        state().r.ping()
    except (redis.RedisError, OSError):
        return Response("redis not answering\n", status=503, mimetype="text/plain")
    return Response("ok\n", mimetype="text/plain")
