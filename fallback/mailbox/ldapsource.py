"""Reading the user directory from LDAP: a paged search turned into provisioning entries.

`fallback provision --ldap-url ...` feeds these entries into the same
Provisioner as a CSV or passwd-file, so an LDAP user is stored exactly as a
file line would be.  The search uses RFC 2696 simple paged results (ldap3's
paged_search generator), so a directory of millions streams with one page in
memory.  Each entry is checked here, with its DN in the report, and never
reaches the store when it is bad: a missing or unverifiable userPassword, an
address that is not one, a duplicate.

`userPassword` values are kept as they are when they carry a `{SCHEME}`
prefix (LDAP returns bytes; they are Dovecot's format already).  A value
without one is refused unless `--default-scheme` names the scheme it is in,
the passwd-file rule: hashing a hash as plain text would lock the user out.

Multi-valued alias attributes (e.g. mailLocalAddress) become aliases that
point at the entry's address, stored with LDAP's origin (aliases.py) so an
LDAP --sync removes them when LDAP no longer names them.  ldap3 is used (pure Python: no libldap build
on the provisioning host, and its paged search is a plain generator).
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import ldap3
import redis
from ldap3.core import exceptions as ldap_errors

from fallback.addresses import normalize_address
from fallback.config.secretfiles import read_secret_file
from fallback.errors import ConfigError, DirectoryUnavailable, InputError
from fallback.mailbox import passwords
from fallback.mailbox.aliases import LDAP, Alias, Aliases
from fallback.mailbox.directory import check_mailstore
from fallback.mailbox.provision import (
    CHUNK,
    PROGRESS_EVERY,
    Entry,
    Invalid,
    Provisioner,
    Report,
    without_cycle_collector,
)

# Entries without a mail address can be no mailbox; the object class varies from one provider to
# the next (inetOrgPerson, posixAccount with a mail schema, Active Directory's user), so mail=* is
# the one filter that fits them all.
DEFAULT_FILTER = "(mail=*)"
DEFAULT_MAP = {"address": "mail", "password": "userPassword"}
MAP_FIELDS = ("address", "password", "mailstore", "alternate", "alias")
PAGE_SIZE = 500        # OpenLDAP's default size limit: one page is never refused
TIMEOUT = 30           # seconds for the connection and for each page


def parse_map(text: str | None) -> dict[str, str]:
    """`address=mail,alias=mailLocalAddress` over the defaults; InputError naming the bad part."""
    mapping = dict(DEFAULT_MAP)
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, attr = (part.strip() for part in item.partition("="))
        if not sep or not attr:
            raise InputError(f"--ldap-map: expected FIELD=ATTRIBUTE, found {item.strip()!r}")
        if name not in MAP_FIELDS:
            raise InputError(f"--ldap-map: unknown field {name!r} (known: {', '.join(MAP_FIELDS)})")
        mapping[name] = attr
    return mapping


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/"):
        raise InputError(f"--ldap-url: expected ldap://HOST[:PORT] or ldaps://HOST[:PORT], found {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        raise InputError(f"--ldap-url: not a port number in {url!r}") from None
    return url.rstrip("/")


@dataclass(frozen=True)
class LdapQuery:
    url: str
    base: str
    bind_dn: str | None = None
    password: str | None = None
    filter: str = DEFAULT_FILTER
    mapping: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MAP))
    page_size: int = PAGE_SIZE
    ca_file: Path | None = None     # ldaps://: the CAs of its certificate (None: the system's)

    @classmethod
    def from_options(cls, url: str, base: str | None, bind_dn: str | None, password_file: Path | None,
                     filter_: str | None, mapping: str | None, ca_file: Path | None = None) -> LdapQuery:
        """Checked before anything connects: one line for the first bad option."""
        if not base:
            raise InputError("--ldap-url needs --ldap-base DN (where the users are)")
        if (bind_dn is None) != (password_file is None):
            raise InputError("--ldap-bind-dn and --ldap-password-file go together")
        url = check_url(url)
        if ca_file is not None:
            check_ca_file(url, ca_file)
        password = None if password_file is None else read_secret_file("--ldap-password-file",
                                                                       password_file, keep_spaces=True)
        return cls(url, base, bind_dn, password, filter_ or DEFAULT_FILTER, parse_map(mapping),
                   ca_file=ca_file)


def check_ca_file(url: str, ca_file: Path) -> None:
    """--ldap-ca-file: for ldaps:// only, and a bundle of PEM certificates ssl can load."""
    if not url.startswith("ldaps:"):
        raise InputError(f"--ldap-ca-file is for ldaps:// URLs; {url} is not encrypted")
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise InputError(f"--ldap-ca-file: {ca_file} does not exist") from None
    except ssl.SSLError:  # before OSError, whose subclass it is
        raise InputError(f"--ldap-ca-file: {ca_file} holds no PEM certificate") from None
    except OSError as exc:
        raise InputError(f"--ldap-ca-file: cannot read {ca_file}: {exc.strerror or exc}") from None


@dataclass
class Problem:
    where: str      # the entry's DN, or the alias address
    reason: str


def _connect(query: LdapQuery) -> ldap3.Connection:
    tls = None
    if query.url.startswith("ldaps:"):
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED,
                        ca_certs_file=None if query.ca_file is None else str(query.ca_file))
    server = ldap3.Server(query.url, get_info=ldap3.NONE, connect_timeout=TIMEOUT, tls=tls)
    conn = ldap3.Connection(server, user=query.bind_dn, password=query.password, read_only=True,
                            raise_exceptions=True, receive_timeout=TIMEOUT, auto_referrals=False)
    try:
        conn.open()
    except ldap_errors.LDAPSocketOpenError as exc:
        text = str(exc).lower()
        reason = ("connection refused" if "refused" in text
                  else "timed out" if "timed out" in text or "timeout" in text
                  else _tls_reason(query, text) or str(exc))
        raise DirectoryUnavailable(f"LDAP {query.url} unreachable: {reason}") from None
    except ldap_errors.LDAPException as exc:
        raise DirectoryUnavailable(f"LDAP {query.url} unreachable: {exc}") from None
    try:
        conn.bind()
    except ldap_errors.LDAPInvalidCredentialsResult:
        conn.unbind()
        who = query.bind_dn or "anonymous"
        raise ConfigError(f"LDAP {query.url}: bind as {who} refused: invalid credentials "
                          "(check --ldap-bind-dn and --ldap-password-file)") from None
    except ldap_errors.LDAPException as exc:
        conn.unbind()
        raise DirectoryUnavailable(f"LDAP {query.url}: bind failed: {exc}") from None
    return conn


def _tls_reason(query: LdapQuery, text: str) -> str | None:
    """ldap3's TLS failures, said in the operator's terms (None: not one of them)."""
    if "certificate verify failed" in text:
        return ("its TLS certificate is not signed by a CA the system trusts (give --ldap-ca-file)"
                if query.ca_file is None else f"its TLS certificate is not signed by a CA in {query.ca_file}")
    if "hostname" in text and ("match" in text or "mismatch" in text):
        return "its TLS certificate does not name that host"
    return None


def _search(query: LdapQuery, conn: ldap3.Connection) -> Iterator[tuple[str, dict[str, list[bytes]]]]:
    """(DN, attribute name in lower case -> raw values) for each entry found, a page at a time."""
    attributes = sorted(set(query.mapping.values()))
    try:
        pages = conn.extend.standard.paged_search(query.base, query.filter, ldap3.SUBTREE,
                                                  attributes=attributes, paged_size=query.page_size,
                                                  generator=True)
        for item in pages:
            if item.get("type") != "searchResEntry":
                continue  # referrals: the provider's other servers are not followed
            raw = item.get("raw_attributes") or {}
            yield str(item["dn"]), {name.lower(): list(values) for name, values in raw.items()}
    except ldap_errors.LDAPNoSuchObjectResult:
        raise InputError(f"LDAP {query.url}: base DN {query.base!r} does not exist (noSuchObject)") from None
    except ldap_errors.LDAPInvalidFilterError:
        raise InputError(f"--ldap-filter: not an LDAP filter: {query.filter!r}") from None
    except ldap_errors.LDAPInvalidDnError:
        raise InputError(f"--ldap-base: not a DN: {query.base!r}") from None
    except ldap_errors.LDAPSizeLimitExceededResult:
        raise DirectoryUnavailable(f"LDAP {query.url}: the server's size limit cut the search short; "
                                   "allow paged results past it (OpenLDAP: size.prtotal=unlimited)") from None
    except ldap_errors.LDAPOperationResult as exc:
        raise DirectoryUnavailable(f"LDAP {query.url}: search failed: {exc.description}: "
                                   f"{exc.message or exc.result}") from None
    except ldap_errors.LDAPCommunicationError as exc:
        raise DirectoryUnavailable(f"LDAP {query.url}: connection lost during the search: {exc}") from None


def _text(values: list[bytes]) -> list[str]:
    return [v.decode("utf-8") for v in values]


class LdapEntries:
    """The directory as a source of Entry / Invalid items that can be read more than once (each
    read is a new search), as the Provisioner and sync take a file.  An Invalid's `line` is the
    entry's number in the search and its reason starts with the entry's DN.  The aliases of the
    last read are in `aliases`, with their problems in `alias_problems`."""

    def __init__(self, query: LdapQuery, default_mailstore: str, default_scheme: str | None,
                 progress: Callable[[int], None] = lambda found: None) -> None:
        self.query = query
        self.default_mailstore = default_mailstore
        self.default_scheme = (None if default_scheme is None
                               else passwords.check_scheme_name("default_scheme", default_scheme))
        self.progress = progress
        self.found = 0                              # entries the last search returned
        self.aliases: dict[str, list[str]] = {}     # alias address -> the addresses it names
        self.alias_problems: list[Problem] = []
        self._seen: dict[str, int] = {}             # address -> entry number, for duplicates

    def __iter__(self) -> Iterator[Entry | Invalid]:
        self.found, self.aliases, self.alias_problems, self._seen = 0, {}, [], {}
        conn = _connect(self.query)
        try:
            for dn, attrs in _search(self.query, conn):
                self.found += 1
                n = self.found
                if n % PROGRESS_EVERY == 0:
                    self.progress(n)
                try:
                    entry = self._entry(n, attrs)
                    if entry.address in self._seen:
                        raise InputError(f"duplicate address {entry.address} "
                                         f"(also in entry {self._seen[entry.address]} of the search)")
                except (InputError, UnicodeDecodeError) as exc:
                    reason = exc.reason if isinstance(exc, InputError) else "a value is not UTF-8 text"
                    yield Invalid(n, f"{dn}: {reason}")
                    continue
                self._seen[entry.address] = n
                self._collect_aliases(dn, entry.address, attrs)
                yield entry
        finally:
            conn.unbind()
        self.progress(self.found)
        self._drop_aliases_of_mailboxes()

    def _one(self, attrs: dict[str, list[bytes]], name: str, what: str) -> str | None:
        attr = self.query.mapping.get(name)
        if attr is None:
            return None
        values = attrs.get(attr.lower(), [])
        if not values:
            return None
        if len(values) > 1:
            raise InputError(f"{len(values)} values of {attr} ({what}); expected one")
        return values[0].decode("utf-8").strip()

    def _entry(self, n: int, attrs: dict[str, list[bytes]]) -> Entry:
        mapping = self.query.mapping
        address = self._one(attrs, "address", "the address")
        if not address:
            raise InputError(f"no {mapping['address']} (the address)")
        address = normalize_address(address)
        # A userPassword value may have trailing spaces that are part of the hash: only line ends go.
        raw_password = self._one(attrs, "password", "the password")
        if raw_password is None:
            raise InputError(f"no {mapping['password']} (the password hash); if the directory has it, "
                             "the bind DN may not read it (give --ldap-bind-dn)")
        password = self._password(address, raw_password)
        store = self._one(attrs, "mailstore", "the mailstore") or self.default_mailstore
        alternate = self._one(attrs, "alternate", "the alternate address") or ""
        return Entry(n, address, password, check_mailstore(store),
                     normalize_address(alternate) if alternate else "")

    def _password(self, address: str, value: str) -> str:
        """The stored form, checked as the Provisioner will check it (so it refuses nothing later)."""
        scheme, _ = passwords.split_scheme(value)
        if scheme is None:
            if self.default_scheme is None:
                raise InputError(f"the password of {address} has no {{SCHEME}} prefix; give "
                                 "--default-scheme SCHEME (Dovecot's default_pass_scheme) if the "
                                 "directory relies on one")
            value = "{" + self.default_scheme + "}" + value
            scheme = self.default_scheme
        if scheme == "PLAIN":
            passwords.plain_text(value)   # hashed by the Provisioner; refuses an empty one
            return value
        return passwords.check_stored(value)

    def _collect_aliases(self, dn: str, address: str, attrs: dict[str, list[bytes]]) -> None:
        attr = self.query.mapping.get("alias")
        if attr is None:
            return
        for value in _text(attrs.get(attr.lower(), [])):
            try:
                alias = normalize_address(value)
            except InputError as exc:
                self.alias_problems.append(Problem(dn, f"{attr} {value!r}: {exc.reason}"))
                continue
            if alias == address:
                continue  # sendmail's mailLocalAddress lists the user's own address too
            targets = self.aliases.setdefault(alias, [])
            if address not in targets:
                targets.append(address)

    def _drop_aliases_of_mailboxes(self) -> None:
        """An address that is a mailbox stays one: delivering it elsewhere would hide its mail."""
        for alias in [a for a in self.aliases if a in self._seen]:
            del self.aliases[alias]
            attr = self.query.mapping["alias"]
            self.alias_problems.append(Problem(alias, f"is a mailbox and also a {attr} of another "
                                                      "entry; kept as the mailbox"))


def load_aliases(r: redis.Redis, buckets: int, aliases: dict[str, list[str]]) -> int:
    """Store the collected aliases (each replacing a stored one of the same address); returns how many
    were new."""
    return Aliases(r, buckets).put_many(Alias(a, tuple(sorted(t)), LDAP) for a, t in aliases.items())


def load(provisioner: Provisioner, entries: LdapEntries, strict: bool = False) -> Report:
    """Add or update the directory's mailboxes from LDAP, as Provisioner.run does from a file
    (nothing is removed: that is sync's job).  `strict` searches twice: to check every entry,
    then, when none is bad, to load."""
    report = Report()
    if strict:
        report.invalid = [item for item in entries if isinstance(item, Invalid)]
        if report.invalid or entries.alias_problems:
            report.loaded = False
            return report
    with without_cycle_collector():
        items = iter(entries)
        while chunk := list(itertools.islice(items, CHUNK)):
            provisioner.write(provisioner.plan_chunk(chunk, report))
    report.invalid.sort(key=lambda item: item.line)
    return report
