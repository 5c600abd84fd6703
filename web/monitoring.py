"""What load balancers and Prometheus ask the webmail: /readyz and /metrics.

/healthz (web.pages) only says "the process and Redis answer"; /readyz says
"this instance can serve users now": Redis answers, takes writes (not a
read-only replica, memory not full) and holds a provisioned directory.  The
secret key was already checked when the app was made.

/metrics is the whole service's figures (fallback.ops.metrics), the same from
every instance.  The log-in counts of this process are added to the shared
ones in Redis after a request once `metrics_flush_interval` has passed, and
before /metrics answers, so a scrape sees its own process's latest counts.

Both answer only loopback clients and holders of the token in
`metrics_token_file` (`Authorization: Bearer TOKEN`); anyone else gets 403.
The client is the socket's peer (no header is trusted for it), and a loopback
request that carries a proxy's forwarding header came through a reverse proxy
on this machine from somewhere else, so it needs the token too.  /healthz and
/status (web.pages) stay open.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, request

from fallback import keys
from fallback.config import metrics_token
from fallback.ops import metrics
from web.context import state

log = logging.getLogger(__name__)

bp = Blueprint("monitoring", __name__)

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
EXTENSION = "fallback.metrics"  # app.extensions: the metrics token, read once at start
# Set by reverse proxies (nginx, HAProxy, Apache, Caddy, Traefik) on what they pass on.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Host", "X-Client-IP")
FORBIDDEN = ("Forbidden: /metrics and /readyz answer this machine (loopback) and holders of the "
             "metrics token (Authorization: Bearer, see metrics_token_file).\n")


def _loopback_peer() -> bool:
    try:
        peer = ipaddress.ip_address((request.remote_addr or "").split("%", 1)[0])
    except ValueError:  # a Unix socket or nothing: not known to be this machine
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    if not peer.is_loopback:
        return False
    return not any(request.headers.get(name) for name in PROXY_HEADERS)


def _has_token() -> bool:
    expected: str | None = current_app.extensions.get(EXTENSION)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if expected is None or scheme.lower() != "bearer" or not given.strip():
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


@bp.before_request
def _only_operators() -> Response | None:
    if _loopback_peer() or _has_token():
        return None
    log.warning("monitoring: refused %s to %s (not loopback, no valid token)", request.path,
                request.remote_addr)
    return Response(FORBIDDEN, status=403, mimetype="text/plain")


def not_ready_reason(r: redis.Redis) -> str | None:
    """Why this instance cannot serve users now; None when it can."""
    try:
        r.ping()
    except (redis.RedisError, OSError):
        return "redis not answering"
    try:
        role = r.info("replication").get("role")
        mem = r.info("memory")
    except redis.ResponseError:  # INFO renamed or forbidden on a managed Redis: cannot tell
        role, mem = None, {}
    except (redis.RedisError, OSError):
        return "redis not answering"
    if role == "slave":
        return "redis is a read-only replica (log-ins and sent mail need writes)"
    limit = int(mem.get("maxmemory", 0) or 0)
    if limit and int(mem.get("used_memory", 0) or 0) >= limit:
        return "redis memory is full (maxmemory reached)"
    try:
        if not r.hlen(keys.DIR_MAILSTORES):
            return "no mailbox is provisioned yet (fallback provision)"
    except (redis.RedisError, OSError):
        return "redis not answering"
    return None


@bp.get("/readyz")
def readyz() -> Any:
    reason = not_ready_reason(state().r)
    if reason is not None:
        return Response(f"not ready: {reason}\n", status=503, mimetype="text/plain")
    return Response("ready\n", mimetype="text/plain")


@bp.get("/metrics")
def prometheus() -> Any:
    st = state()
    try:
        st.counters.flush(st.r)
    except (redis.RedisError, OSError) as exc:  # the figures below say Redis is down
        log.warning("metrics: log-in counts not flushed: %s", exc)
    body = metrics.exposition(st.r, st.settings.memory_reserve)
    return Response(body, mimetype=PROMETHEUS_TEXT)


def _flush_when_due(response: Response) -> Response:
    st = state()
    # Counted here, flushed with the log-ins: a 5xx rate is what an operator alerts on.
    st.counters.add(metrics.WEBMAIL_RESPONSES, status=f"{response.status_code // 100}xx")
    if st.counters.due():
        try:
            st.counters.flush(st.r)
        except (redis.RedisError, OSError) as exc:  # kept in memory for the next try
            log.warning("metrics: log-in counts not flushed: %s", exc)
    return response


def install(app: Flask) -> None:
    app.extensions[EXTENSION] = metrics_token(app.extensions["fallback"].settings)
    app.after_request(_flush_when_due)
