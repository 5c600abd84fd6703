"""Turning stored raw bytes into something safe to show: headers, body, attachments.

Parsing is for display only and never raises: a message the `email` package
cannot make sense of is shown as its raw text.  HTML bodies are sanitised
here with nh3 (an allow-list: no scripts, no forms, no SVG/MathML, no
`<base>`/`<meta>`, no `srcset`, CSS properties that cannot load anything);
remote images are dropped unless the user asked for them, and `cid:` images
become `data:` URLs taken from the message itself, so the sandboxed frame
never needs a cookie or the network.  No URL in the mail may lead back into
the webmail: a link or image that is relative (`?remote=1`, `/compose`),
protocol-relative (`//host`), or names the webmail's own host loses its URL,
since the browser would send it with the user's cookie.  The frame's own CSP
(web/security.py) is the second wall behind this one.
"""

from __future__ import annotations

import base64
import email
import email.policy
import html
import ipaddress
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

import nh3

TAGS = {
    "a", "abbr", "address", "b", "big", "blockquote", "br", "caption", "center", "cite", "code",
    "col", "colgroup", "dd", "del", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5",
    "h6", "hr", "i", "img", "ins", "kbd", "li", "ol", "p", "pre", "q", "s", "small", "span",
    "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt",
    "u", "ul",
}
_COMMON = {"style", "title", "align", "dir", "lang", "valign", "width", "height", "bgcolor"}
ATTRIBUTES = {
    "*": _COMMON,
    "a": {"href", "name"},
    "img": {"src", "alt", "border"},
    "td": {"colspan", "rowspan", "nowrap"},
    "th": {"colspan", "rowspan", "nowrap"},
    "table": {"border", "cellpadding", "cellspacing", "summary"},
    "font": {"color", "face", "size"},
    "ol": {"start", "type"},
    "col": {"span"},
    "colgroup": {"span"},
}
# None of these can name a URL (no background-image, list-style-image, content, cursor...).
STYLE_PROPERTIES = {
    "color", "background-color", "font", "font-family", "font-size", "font-style", "font-weight",
    "text-align", "text-decoration", "text-indent", "text-transform", "line-height",
    "letter-spacing", "white-space", "vertical-align", "margin", "margin-top", "margin-bottom",
    "margin-left", "margin-right", "padding", "padding-top", "padding-bottom", "padding-left",
    "padding-right", "border", "border-top", "border-bottom", "border-left", "border-right",
    "border-color", "border-style", "border-width", "border-collapse", "border-spacing",
    "border-radius", "width", "height", "max-width", "min-width", "display", "direction",
}
URL_SCHEMES = {"http", "https", "mailto", "cid"}
_INLINE_IMAGE = re.compile(r"^image/(png|gif|jpeg|webp|bmp)$")
INLINE_LIMIT = 10 * 1024 * 1024  # bytes of cid: images inlined into one message view


@dataclass
class Attachment:
    index: int
    filename: str
    content_type: str
    size: int


@dataclass
class Rendered:
    """What the message page shows.  Kept between requests (web.mailbox.rendered): read it,
    never change it."""

    headers: dict[str, str]
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    malformed: bool = False
    has_remote: bool = False


def rendered_size(shown: Rendered) -> int:
    """About the characters a Rendered holds (what bounds the kept ones)."""
    headers = sum(len(k) + len(v) for k, v in shown.headers.items())
    parts = sum(len(a.filename) + len(a.content_type) + 16 for a in shown.attachments)
    return len(shown.text or "") + len(shown.html or "") + headers + parts + 64


def parse(raw: bytes) -> EmailMessage | None:
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception:  # the stdlib parser is lenient, but never let display break
        return None
    return msg if isinstance(msg, EmailMessage) else None


def header(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
        return "" if value is None else " ".join(str(value).split())
    except Exception:  # undecodable header: show what is there
        raw = msg.get_all(name, failobj=[])
        return " ".join(str(raw[0]).split()) if raw else ""


# Header values the stdlib's header objects would give back unchanged (after the whitespace
# folding `header` does): printable ASCII without encoded words, and for the address headers
# only plain `Name Words <local@domain>` or `local@domain` items, joined by ", ".  Parsing an
# address header costs as much as the rest of a message page's headers (issue 17); anything
# else takes the parser's path.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_ITEM = rf"(?:{_ATEXT}(?: {_ATEXT})* <{_DOT_ATOM}@{_DOT_ATOM}>|{_DOT_ATOM}@{_DOT_ATOM})"
_PLAIN_ADDRESSES = re.compile(rf"{_ITEM}(?:, {_ITEM})*")
_PRINTABLE = re.compile(r"[ -~]*")
_PLAIN_KINDS = {"subject": None, "from": _PLAIN_ADDRESSES, "to": _PLAIN_ADDRESSES, "cc": _PLAIN_ADDRESSES}


def shown_headers(msg: Message, names: tuple[str, ...]) -> dict[str, str]:
    """header(msg, name) for each name, without the parser for the plain values above."""
    first: dict[str, str] = {}
    for key, value in msg.raw_items():
        first.setdefault(key.lower(), value)
    out = {}
    for name in names:
        lower = name.lower()
        raw = first.get(lower)
        if raw is None:
            out[name] = ""
            continue
        if isinstance(raw, str) and lower in _PLAIN_KINDS and "=?" not in raw:
            value = " ".join(raw.split())
            shape = _PLAIN_KINDS[lower]
            if _PRINTABLE.fullmatch(value) and (shape is None or shape.fullmatch(value)):
                out[name] = value
                continue
        out[name] = header(msg, name)
    return out


def part_text(part: Message) -> str:
    """A text part's content, whatever its declared charset or encoding."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except Exception:  # unknown charset, broken transfer encoding: decode leniently below
        content = None
    if isinstance(content, str):
        return content
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode(part.get_content_charset() or "utf-8", "replace") \
            if _known_charset(part.get_content_charset()) else payload.decode("utf-8", "replace")
    payload = part.get_payload()
    return payload if isinstance(payload, str) else ""


def _known_charset(name: str | None) -> bool:
    if not name:
        return False
    try:
        b"".decode(name)
    except LookupError:
        return False
    return True


def leaves(msg: Message) -> list[Message]:
    """Every non-multipart part, in a stable order (the index is the attachment's URL)."""
    return [p for p in msg.walk() if not p.is_multipart()]


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return "attachment"
    return None if name is None else " ".join(str(name).split()) or "attachment"


def _is_attachment(part: Message) -> bool:
    disposition = (part.get_content_disposition() or "").lower()
    return disposition == "attachment" or (_filename(part) is not None and disposition != "inline")


def _payload_bytes(part: Message) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        return b""
    return payload if isinstance(payload, bytes) else b""


def attachments(msg: Message) -> list[tuple[Attachment, Message]]:
    out = []
    for index, part in enumerate(leaves(msg)):
        if _is_attachment(part):
            data = _payload_bytes(part)
            name = _filename(part) or f"part-{index}"
            out.append((Attachment(index, name, part.get_content_type(), len(data)), part))
    return out


def _cid_map(msg: Message) -> dict[str, str]:
    """Content-ID -> data: URL of inline images, within INLINE_LIMIT."""
    out: dict[str, str] = {}
    budget = INLINE_LIMIT
    for part in leaves(msg):
        cid = header(part, "Content-ID").strip().strip("<>")
        ctype = part.get_content_type()
        if not cid or not _INLINE_IMAGE.match(ctype):
            continue
        data = _payload_bytes(part)
        if len(data) > budget:
            continue
        budget -= len(data)
        out[cid] = f"data:{ctype};base64,{base64.b64encode(data).decode()}"
    return out


# What a browser ignores or strips in a URL before reading it (WHATWG URL: C0 controls and
# spaces at the ends, tab and line breaks anywhere): checked the way the browser will read it.
_URL_TRIM = "".join(chr(c) for c in range(0x21))
_URL_DROP = re.compile(r"[\t\n\r]")
# http(s) with an authority; a backslash counts as a slash in these URLs.  "http:foo" without
# the slashes is relative to the page in a browser, so it does not match.
_WEB_URL = re.compile(r"(https?):[/\\]{2}([^/\\?#]*)(.*)", re.IGNORECASE | re.DOTALL)
# Declarations that could name a resource (or hide a name behind CSS escapes).
_STYLE_LOADS = re.compile(r"url\s*\(|image(?:-set)?\s*\(|element\s*\(|expression|@import|\\",
                          re.IGNORECASE)


def url_host(host: str) -> str | None:
    """A URL's host as a browser compares it: lower case, IDNA, IPv4 in any notation made
    dotted; None when no browser would take it as a host."""
    host = urllib.parse.unquote(host.rsplit("@", 1)[-1])
    if host.startswith("["):
        end = host.find("]")
        try:
            return str(ipaddress.ip_address(host[1:end])) if end > 0 else None
        except ValueError:
            return None
    host = host.split(":", 1)[0].rstrip(".")
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    if not host:
        return None
    if re.fullmatch(r"[0-9a-fx.]+", host) and re.fullmatch(r"[0-9]+|0x[0-9a-f]*", host.split(".")[-1]):
        try:  # 2130706433, 0x7f.1 and 127.1 are all 127.0.0.1 to a browser
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return host


def outside_url(value: str, own_hosts: frozenset[str]) -> str | None:
    """The URL as the browser will read it when it is absolute http(s) or mailto and not on
    the webmail's own host; None for anything that would come back to the webmail."""
    url = _URL_DROP.sub("", value.strip(_URL_TRIM))
    if url[:7].lower() == "mailto:":
        return url
    m = _WEB_URL.fullmatch(url)
    if not m:
        return None  # relative, protocol-relative, or a scheme the allow-list refuses anyway
    host = url_host(m.group(2))
    if host is None or host in own_hosts:
        return None
    return f"{m.group(1).lower()}://{m.group(2)}{m.group(3)}"


def _safe_style(value: str) -> str | None:
    kept = [d for d in value.split(";") if d.strip() and not _STYLE_LOADS.search(d)]
    return ";".join(kept) or None


def sanitize(html: str, cids: dict[str, str] | None = None, remote: bool = False,
             own_hosts: frozenset[str] = frozenset()) -> tuple[str, bool]:
    """(safe HTML, whether remote content was blocked).

    `own_hosts` are the webmail's host names (url_host form): URLs to them are dropped like
    relative ones."""
    cids = cids or {}
    blocked = False

    def keep(tag: str, attr: str, value: str) -> str | None:
        nonlocal blocked
        if attr == "style":
            return _safe_style(value)
        if tag == "img" and attr == "src":
            if value.strip(_URL_TRIM).lower().startswith("cid:"):
                return cids.get(value.strip(_URL_TRIM)[4:].strip("<>"))
            url = outside_url(value, own_hosts)
            if url is None or url.lower().startswith("mailto:"):
                return None  # would hit this webmail, or is no image at all
            if not remote:
                blocked = True
                return None
            return url
        if tag == "a" and attr == "href":
            return outside_url(value, own_hosts)
        return value

    clean = nh3.clean(
        html, tags=TAGS, attributes=ATTRIBUTES, url_schemes=URL_SCHEMES, attribute_filter=keep,
        filter_style_properties=STYLE_PROPERTIES, link_rel="noopener noreferrer",
        set_tag_attribute_values={"a": {"target": "_blank"}}, strip_comments=True,
    )
    return clean, blocked


def render(raw: bytes, remote: bool = False, own_hosts: frozenset[str] = frozenset()) -> Rendered:
    """Everything the message page shows; malformed MIME becomes plain text, never an error."""
    msg = parse(raw)
    if msg is None:
        return _as_text(raw)
    try:
        headers = shown_headers(msg, ("From", "To", "Cc", "Date", "Subject"))
        out = Rendered(headers=headers)
        html_part = text_part = None
        for part in leaves(msg):
            if _is_attachment(part):
                continue
            ctype = part.get_content_type()
            if ctype == "text/html" and html_part is None:
                html_part = part
            elif ctype == "text/plain" and text_part is None:
                text_part = part
        if html_part is not None:
            out.html, out.has_remote = sanitize(part_text(html_part), _cid_map(msg), remote,
                                                  own_hosts)
        if text_part is not None:
            out.text = part_text(text_part)
        elif html_part is None:
            out.text = "" if msg.is_multipart() else part_text(msg)
        out.attachments = [a for a, _ in attachments(msg)]
        if msg.defects and out.text is None and out.html is None:
            return _as_text(raw, headers)
        return out
    except Exception:  # any surprise in a hostile message: show it as it arrived
        return _as_text(raw)


def _as_text(raw: bytes, headers: dict[str, str] | None = None) -> Rendered:
    return Rendered(headers=headers or {}, text=raw.decode("utf-8", "replace"), malformed=True)


def body_text(raw: bytes) -> str:
    """The plain text to quote in a reply or forward (HTML-only mail: its text, tags removed)."""
    r = render(raw)
    if r.text is not None and not r.malformed:
        return r.text
    if r.html is not None:
        stripped = nh3.clean(r.html, tags=set())
        return re.sub(r"\n{3,}", "\n\n", html.unescape(stripped)).strip() + "\n"
    return r.text or ""


def find_header(raw: bytes, name: str) -> str:
    msg = parse(raw)
    return "" if msg is None else header(msg, name)


def original_parts(raw: bytes) -> list[tuple[str, str, bytes]]:
    """(filename, content type, bytes) of a message's attachments, to carry on forward."""
    msg = parse(raw)
    if msg is None:
        return []
    out: list[tuple[str, str, bytes]] = []
    for att, part in attachments(msg):
        out.append((att.filename, att.content_type, _payload_bytes(part)))
    return out


def attachment_payload(raw: bytes, index: int) -> tuple[str, str, bytes] | None:
    msg = parse(raw)
    if msg is None:
        return None
    for att, part in attachments(msg):
        if att.index == index:
            return att.filename, att.content_type, _payload_bytes(part)
    return None
