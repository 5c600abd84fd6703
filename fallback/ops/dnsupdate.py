"""The DNS switch: MX records moved between the main system and the fallback by RFC 2136 update.

One mode, done well: the MX RRset at one owner name (the zone apex by
default) is replaced as a whole; the A/AAAA records of the hosts it names
are left alone.  Every update is signed with TSIG (dnspython) and sent over
TCP to the zone's primary server.

A switch is two updates, in this order:

1. lower the TTL of the current MX records (same data, `dns_low_ttl`), with
   a prerequisite that they are still exactly what was read, so a switch
   racing another never clobbers it;
2. replace the MX RRset with the target records at the low TTL.

Caches still hold the old records for up to their old TTL; lowering it
ahead of time (`fallback dns lower-ttl`) makes the later switch take effect
within the low TTL.  The target records come from `dns_fallback_mx` or
`dns_primary_mx`, written as "PREF HOST, PREF HOST"; host names are always
absolute (a trailing dot is optional).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rrset
import dns.tsig
import dns.update

from fallback.config import Settings, read_secret_file
from fallback.errors import ConfigError, DnsError

_KEY_RE = re.compile(
    r'key\s+"?([^"\s{]+)"?\s*\{\s*(?:algorithm\s+"?([\w-]+)"?\s*;\s*secret\s+"([^"]+)"\s*;'
    r'|secret\s+"([^"]+)"\s*;\s*algorithm\s+"?([\w-]+)"?\s*;)\s*\}\s*;', re.S)

_RCODE_HINTS = {
    dns.rcode.REFUSED: "the server refused the update: is update-policy/allow-update set for this key?",
    dns.rcode.NOTAUTH: "the server is not authoritative for the zone, or did not accept the TSIG key",
    dns.rcode.NXRRSET: "the MX records changed since they were read (another switch?); run again",
    dns.rcode.NOTZONE: "the MX name is not inside the zone",
    dns.rcode.SERVFAIL: "the server failed to apply the update (see its log)",
}


@dataclass(frozen=True)
class Target:
    """Where and how to update: server, zone, owner name of the MX records, TSIG key."""

    host: str
    port: int
    zone: dns.name.Name
    name: dns.name.Name
    key: dns.tsig.Key
    timeout: float


def load_tsig_key(path: Path) -> dns.tsig.Key:
    """The first key clause of a BIND key file (`tsig-keygen NAME` output)."""
    text = read_secret_file("dns_tsig_key_file", path)
    m = _KEY_RE.search(text)
    if not m:
        raise ConfigError(
            f"dns_tsig_key_file: {path} has no `key \"NAME\" {{ algorithm ...; secret ...; }};`")
    name = m.group(1)
    algorithm = m.group(2) or m.group(5)
    secret = m.group(3) or m.group(4)
    try:
        return dns.tsig.Key(name, secret, algorithm)
    except Exception as exc:  # bad base64 or unknown algorithm
        raise ConfigError(f"dns_tsig_key_file: {path}: {exc}") from None


def parse_server(text: str) -> tuple[str, int]:
    """HOST, HOST:PORT or [IPv6]:PORT -> (IP address, port); names resolved once, here."""
    text = text.strip()
    m = re.fullmatch(
        r"\[([0-9a-fA-F:.]+)\](?::(\d{1,5}))?|([^\s:\[\]]+)(?::(\d{1,5}))?|([0-9a-fA-F:]+)", text)
    if not m:
        raise ConfigError(f"dns_server: {text!r} is not HOST, HOST:PORT or [IPv6]:PORT")
    host = m.group(1) or m.group(3) or m.group(5)
    port = int(m.group(2) or m.group(4) or 53)
    if not 0 < port <= 65535:
        raise ConfigError(f"dns_server: {port} is not a port number")
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]), port
    except OSError as exc:
        raise DnsError(f"dns_server: cannot resolve {host}: {exc}") from None


def parse_mx_list(text: str, setting: str) -> list[dns.rdtypes.ANY.MX.MX]:
    """'10 mx1.example.com, 20 mx2.example.com' -> MX rdata (names absolute)."""
    records = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d{1,5})\s+(\S+)", part)
        if not m or int(m.group(1)) > 65535:
            raise ConfigError(f"{setting}: {part!r} is not 'PREFERENCE HOST' (e.g. '10 mx.example.com')")
        try:
            rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, part, origin=dns.name.root,
                                     relativize=False)
        except dns.exception.DNSException as exc:
            raise ConfigError(f"{setting}: {part!r}: {exc}") from None
        records.append(rd)
    if not records:
        raise ConfigError(f"{setting}: no MX records given")
    return records  # type: ignore[return-value]


def target_from(settings: Settings) -> Target:
    missing = [n for n in ("dns_server", "dns_zone", "dns_tsig_key_file") if getattr(settings, n) is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: needed for the DNS switch (flag, FALLBACK_* or config file)")
    host, port = parse_server(settings.dns_server or "")
    try:
        zone = dns.name.from_text(settings.dns_zone or "")
        name = zone if settings.dns_mx_name.strip() in ("", "@") else dns.name.from_text(
            settings.dns_mx_name, origin=zone)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"dns_zone/dns_mx_name: {exc}") from None
    if not name.is_subdomain(zone):
        raise ConfigError(f"dns_mx_name: {name} is not inside the zone {zone}")
    return Target(host, port, zone, name, load_tsig_key(settings.dns_tsig_key_file or Path()),
                  settings.dns_timeout)


def records_for(settings: Settings, to: str) -> list[dns.rdtypes.ANY.MX.MX]:
    setting = "dns_fallback_mx" if to == "fallback" else "dns_primary_mx"
    text = getattr(settings, setting)
    if not text:
        raise ConfigError(f"{setting}: not set; it says what the MX records are when switched to {to}")
    return parse_mx_list(text, setting)


def _where(t: Target) -> str:
    return f"{t.host}:{t.port}"


def current(t: Target) -> dns.rrset.RRset | None:
    """The MX RRset as the primary server holds it now (TCP, signed, so no cache is in the way)."""
    q = dns.message.make_query(t.name, dns.rdatatype.MX)
    q.use_tsig(t.key)
    response = _exchange(t, q, "query")
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return None
    if rcode != dns.rcode.NOERROR:
        raise DnsError(f"MX query for {t.name} at {_where(t)} failed: {dns.rcode.to_text(rcode)}")
    try:
        return response.find_rrset(response.answer, t.name, dns.rdataclass.IN, dns.rdatatype.MX)
    except KeyError:
        return None


def lower_ttl_update(t: Target, now: dns.rrset.RRset | None, ttl: int) -> dns.update.UpdateMessage | None:
    """Step 1: the same records at the low TTL; None when there is nothing to lower."""
    if now is None or now.ttl <= ttl:
        return None
    u = dns.update.UpdateMessage(t.zone, keyring=t.key)
    # Prerequisite: still exactly these records (given as rdatas: RFC 2136 wants TTL 0 there).
    u.present(t.name, *now)
    u.replace(t.name, ttl, *now)
    return u


def switch_update(t: Target, records: list[Any], ttl: int) -> dns.update.UpdateMessage:
    """Step 2: the MX RRset replaced by the target records."""
    u = dns.update.UpdateMessage(t.zone, keyring=t.key)
    u.replace(t.name, ttl, *records)
    return u


def already(now: dns.rrset.RRset | None, records: list[Any], ttl: int) -> bool:
    return now is not None and set(now) == set(records) and now.ttl == ttl


def send(t: Target, update: dns.message.Message) -> None:
    response = _exchange(t, update, "update")
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        hint = _RCODE_HINTS.get(rcode, "see the server's log")
        raise DnsError(f"update of {t.name} MX at {_where(t)} failed: {dns.rcode.to_text(rcode)}: {hint}")


def _exchange(t: Target, message: dns.message.Message, what: str) -> dns.message.Message:
    try:
        return dns.query.tcp(message, t.host, port=t.port, timeout=t.timeout)
    except dns.tsig.PeerBadKey:
        raise DnsError(f"{what} at {_where(t)}: the server does not know TSIG key {t.key.name} "
                       "(check dns_tsig_key_file)") from None
    except (dns.tsig.PeerBadSignature, dns.tsig.BadSignature):
        raise DnsError(f"{what} at {_where(t)}: TSIG signature rejected: the secret of key "
                       f"{t.key.name} does not match the server's") from None
    except (dns.tsig.PeerBadTime, dns.tsig.PeerBadTruncation) as exc:
        raise DnsError(f"{what} at {_where(t)}: TSIG rejected ({type(exc).__name__}): "
                       "check both clocks") from None
    except dns.exception.Timeout:
        raise DnsError(f"{what} at {_where(t)}: no answer within {t.timeout:g}s") from None
    except (dns.exception.DNSException, OSError) as exc:
        raise DnsError(f"{what} at {_where(t)} failed: {exc or type(exc).__name__}") from None
