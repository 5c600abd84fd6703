"""The compose form's fields: address lists and one-line header text, checked before anything is built.

Building and sending the message is fallback.intake.submission's job; this is
only what the HTTP side reads out of the form.
"""

from __future__ import annotations

import email.utils
import re

from flask_babel import gettext, lazy_gettext

from fallback.addresses import normalize_address
from fallback.errors import InputError

MAX_SUBJECT = 998
MAX_THREAD_IDS = 20  # References kept from the original: the nearest ones thread the reply

# What a header value cannot carry: a line end of any kind (str.splitlines splits on every one
# of them, and email's policy refuses them or folds there: a header injection or a half-built
# message), NUL and the other control characters.  Tab is whitespace and stays.
_UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMES = {0x00: "NUL", 0x0A: lazy_gettext("line feed"), 0x0B: lazy_gettext("vertical tab"),
          0x0C: lazy_gettext("form feed"), 0x0D: lazy_gettext("carriage return"),
          0x1C: lazy_gettext("file separator"), 0x1D: lazy_gettext("group separator"),
          0x1E: lazy_gettext("record separator"), 0x7F: lazy_gettext("delete"),
          0x85: lazy_gettext("next line"), 0x2028: lazy_gettext("line separator"),
          0x2029: lazy_gettext("paragraph separator")}
_LABELS = {"To": lazy_gettext("The To field"), "Cc": lazy_gettext("The Cc field"),
           "Bcc": lazy_gettext("The Bcc field"), "Subject": lazy_gettext("The subject"),
           "Attachment": lazy_gettext("The attachment's name")}
_FIELDS = {"To": lazy_gettext("To"), "Cc": lazy_gettext("Cc"), "Bcc": lazy_gettext("Bcc")}
_MSG_ID = re.compile(r"<[!-;=?-~]{1,250}>")  # printable ASCII without <>: what a msg-id may hold


def unsendable(value: str) -> str | None:
    """The first character of `value` a header cannot carry, named for people: 'NUL U+0000'."""
    m = _UNSENDABLE.search(value)
    if m is None:
        return None
    code = ord(m.group(0))
    return f"{_NAMES.get(code) or gettext('control character')} U+{code:04X}"


def check_header_text(name: str, value: str) -> None:
    """A header value with a character it cannot carry is refused, never cleaned up: the user
    sees which field and which character, and fixes it."""
    bad = unsendable(value)
    if bad is not None:
        label = _LABELS.get(name, name)
        raise InputError(f"unsendable character ({bad}) in {name}", public=gettext(
            "%(label)s contains a character that cannot be sent (%(char)s). Remove it and try again.",
            label=label, char=bad))


def clean_header_text(value: str) -> str:
    """For text the user did not type (a forwarded attachment's name): unsendable characters
    become spaces, since the user could not remove them."""
    return _UNSENDABLE.sub(" ", value)


def thread_ids(value: str, keep: int = MAX_THREAD_IDS) -> str:
    """The well-formed message ids of an original's Message-ID/References, the last `keep`.

    They come from mail anyone can send: anything else (a line separator, a
    thousand ids) is left out of the reply rather than refusing the reply.
    """
    return " ".join(_MSG_ID.findall(value)[-keep:])


def parse_addresses(name: str, value: str) -> list[tuple[str, str]]:
    """'Ann <a@x.org>, b@y.org' -> [(display name, normalised address)]; InputError names the bad one."""
    check_header_text(name, value)
    if not value.strip():
        return []
    out = []
    for piece in _split(value):
        display, addr = email.utils.parseaddr(piece)
        try:
            if not addr or "@" not in addr:
                raise InputError("no address")
            normal = normalize_address(addr)
        except InputError:
            raise InputError(f"bad address in {name}", public=gettext(
                "%(field)s: %(piece)s is not an email address.", field=_FIELDS.get(name, name),
                piece=repr(piece.strip()))) from None
        out.append((display, normal))
    return out


def _split(value: str) -> list[str]:
    """Split on commas and semicolons outside quotes and angle brackets."""
    parts, cur, quoted, angle = [], "", False, False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif ch == "<" and not quoted:
            angle = True
        elif ch == ">" and not quoted:
            angle = False
        if ch in ",;" and not quoted and not angle:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]
