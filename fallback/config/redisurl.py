"""The Redis URLs the service understands beyond redis-py's own: what a
redis+cluster:// or redis+sentinel:// URL names, and how a URL is shown in logs.

- `redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`: a Redis Cluster,
  found through any of the seed nodes;
- `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[?sentinel_password=P]`:
  the current primary of SERVICE as the Sentinels report it.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from fallback.errors import ConfigError


def redact_url(url: str) -> str:
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class Topology:
    """A parsed redis+cluster:// or redis+sentinel:// URL."""

    kind: str                       # "cluster" or "sentinel"
    nodes: list[tuple[str, int]]    # seed nodes, or the Sentinels
    username: str | None
    password: str | None
    service: str = ""               # Sentinel: the monitored primary's name
    sentinel_password: str | None = None


def parse_topology(url: str) -> Topology | None:
    """The nodes of a Cluster or Sentinel URL; None for a plain redis:// URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        return None
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(pw) if colon else None
    nodes = [_host_port(part, url) for part in hosts.split(",") if part.strip()]
    if not nodes:
        raise ConfigError(f"redis_url: {redact_url(url)!r} names no HOST:PORT")
    if scheme == CLUSTER_SCHEME:
        if path.strip("/"):
            raise ConfigError(f"redis_url: {redact_url(url)!r}: a Redis Cluster has no databases; "
                              "remove the path")
        return Topology("cluster", nodes, username, password)
    service = urllib.parse.unquote(path.strip("/"))
    if not service or "/" in service:
        raise ConfigError(f"redis_url: {redact_url(url)!r} must name the Sentinel service: "
                          "redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE")
    options = urllib.parse.parse_qs(query)
    unknown = sorted(set(options) - {"sentinel_password"})
    if unknown:
        raise ConfigError(f"redis_url: {redact_url(url)!r}: unknown option {unknown[0]!r} "
                          "(only sentinel_password)")
    sentinel_password = options.get("sentinel_password", [None])[-1]
    return Topology("sentinel", nodes, username, password, service, sentinel_password)


def _host_port(part: str, url: str) -> tuple[str, int]:
    host, colon, port = part.strip().rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"redis_url: {redact_url(url)!r}: {part.strip()!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
