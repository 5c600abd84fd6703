"""The webmail's languages: which one a request is shown in, the switcher, and the texts of
fallback's errors translated at the web edge.

English is the source; French, German and Spanish come from the gettext catalogues in
web/translations/ (Flask-Babel; `make translations` extracts, updates and compiles them).
The language is the `lang` cookie's when it names one of ours (set by the switcher,
`GET /lang/<code>?next=/path`, on every page), else the best match of the browser's
`Accept-Language`, else English.  Without compiled catalogues (.mo) every page is English.

fallback/ never imports web/, so the errors it raises for the user (InputError's `public`
text) arrive in English; `public_text` maps the known ones to translatable messages here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from babel import Locale
from flask import Blueprint, Flask, abort, current_app, g, has_request_context, redirect, request, url_for
from flask_babel import Babel, get_locale, get_translations, gettext
from jinja2 import pass_context
from jinja2.runtime import Context
from markupsafe import Markup

from fallback.config import Settings
from fallback.errors import FallbackError

bp = Blueprint("i18n", __name__)

LANGUAGES = ("en", "fr", "de", "es")
DEFAULT = "en"
# Each language named in itself, as the switcher shows it (never translated).
NAMES = {"en": "English", "fr": "Français", "de": "Deutsch", "es": "Español"}
COOKIE = "lang"
COOKIE_AGE = 365 * 24 * 3600
TRANSLATIONS = Path(__file__).parent / "translations"


def select_locale() -> str:
    """The `lang` cookie when it names one of ours, else Accept-Language's best match, else
    English: chosen once per request.  What get_locale() parses, so also the language code of
    the page cache's key (web/mailbox.py) without Flask-Babel's lookups (issue 17)."""
    if "language" in g:
        found: str = g.language
        return found
    chosen = request.cookies.get(COOKIE, "")
    if chosen not in LANGUAGES:
        # No header: werkzeug's best_match would give the default too, after parsing nothing.
        chosen = DEFAULT
        if request.environ.get("HTTP_ACCEPT_LANGUAGE"):
            chosen = request.accept_languages.best_match(LANGUAGES, default=DEFAULT) or DEFAULT
    g.language = chosen
    return chosen


def current() -> str:
    """This request's language code ('en' outside a request)."""
    locale = get_locale()
    return locale.language if locale is not None else DEFAULT


def locale() -> Locale:
    """This request's Babel locale, for dates (English outside a request)."""
    return get_locale() or Locale.parse(DEFAULT)


def _safe_next(target: str) -> str:
    """Only a path of this site: never another host (//x, /\\x) nor a scheme."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


@bp.get("/lang/<code>")
def switch(code: str) -> Any:
    """The switcher: remember the language a year, back to the page it was chosen on.  A GET:
    it changes only this browser's preference, so a cross-site link can do no harm."""
    if code not in LANGUAGES:
        abort(404)
    response = redirect(_safe_next(request.args.get("next", "")))
    response.set_cookie(COOKIE, code, max_age=COOKIE_AGE, samesite="Lax", path="/", httponly=True,
                        secure=bool(current_app.config["SESSION_COOKIE_SECURE"]))
    return response


# fallback's user-facing error texts (English), and what each is shown as.
_FALLBACK_TEXTS: tuple[tuple[re.Pattern[str], Callable[..., str]], ...] = (
    (re.compile(r"Type at most (?P<n>\d+) characters to look up an address\."),
     lambda n: gettext("Type at most %(n)s characters to look up an address.", n=n)),
    (re.compile(r"This message cannot be sent as it is: a field holds a character mail cannot carry\. .*"),
     lambda: gettext("This message cannot be sent as it is: a field holds a character mail cannot "
                     "carry. Check To, Cc, Bcc, the subject and the attachments' names.")),
    (re.compile(r"Mail to (?P<address>\S+) cannot be delivered now: that address is an alias that loops\..*"),
     lambda address: gettext("Mail to %(address)s cannot be delivered now: that address is an alias "
                             "that loops. Nothing was sent; please tell your mail administrator.",
                             address=address)),
)


def public_text(exc: FallbackError) -> str:
    """The user's text of an error, in their language: fallback's known texts are mapped to
    ours; the web's own were translated when raised; anything else stays as it is."""
    text = str(getattr(exc, "public", "") or "")
    for pattern, message in _FALLBACK_TEXTS:
        m = pattern.fullmatch(text)
        if m is not None:
            return message(**m.groupdict())
    return text


def folder_names(translations: Any = None) -> dict[str, str]:
    """The folders as the pages name them (the store's names are English: INBOX, Sent, ...).
    `translations`: the request's catalogue when the caller has it (one lookup, not five)."""
    text = gettext if translations is None else translations.ugettext
    inbox = text("Inbox")
    return {"INBOX": inbox, "Inbox": inbox, "Sent": text("Sent"), "Drafts": text("Drafts"),
            "Trash": text("Trash")}


# The built-in incident text, shown while the operator has set none of their own.
DEFAULT_INCIDENT = next(f.default for f in dataclasses.fields(Settings) if f.name == "incident_message")


def incident_text(text: str) -> str:
    """The operator's incident text as they wrote it; the built-in default in the page's language."""
    if text == DEFAULT_INCIDENT:  # on every page: the request's catalogue, looked up once
        return str(translations().ugettext("Our main mail system is down. We are working on it."))
    return text


# The request's catalogue, handed to each page once by the context processor below.
PAGE_TRANSLATIONS = "_page_translations"


def _translations(ctx: Context) -> Any:
    found = ctx.get(PAGE_TRANSLATIONS)
    return found if found is not None else translations()


@pass_context
def _page_gettext(ctx: Context, string: str) -> str:
    return str(_translations(ctx).ugettext(string))


@pass_context
def _page_ngettext(ctx: Context, singular: str, plural: str, n: int) -> str:
    return str(_translations(ctx).ungettext(singular, plural, n))


# What Jinja's newstyle gettext makes of the two above, in one call rather than three (its
# `_` looks `gettext` up and calls it, which calls ours): a page has some forty `_()`, and the
# calls through Jinja's context were a sixth of a message page (issue 17).  The same result:
# the translation marked safe where the template autoescapes, then always `%` its variables.
@pass_context
def _page_text(ctx: Context, string: str, **variables: Any) -> str:
    text = _translations(ctx).ugettext(string)
    if ctx.eval_ctx.autoescape:
        text = Markup(text)  # noqa: S704 -- our catalogues, trusted as the templates are
    return text % variables


@pass_context
def _page_ntext(ctx: Context, singular: str, plural: str, num: int, **variables: Any) -> str:
    variables.setdefault("num", num)
    text = _translations(ctx).ungettext(singular, plural, num)
    if ctx.eval_ctx.autoescape:
        text = Markup(text)  # noqa: S704 -- our catalogues, trusted as the templates are
    return text % variables


@pass_context
def _page_pgettext(ctx: Context, context: str, string: str) -> str:
    return str(_translations(ctx).upgettext(context, string))


@pass_context
def _page_npgettext(ctx: Context, context: str, singular: str, plural: str, n: int) -> str:
    return str(_translations(ctx).unpgettext(context, singular, plural, n))


def install(app: Flask) -> None:
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", str(TRANSLATIONS))
    Babel(app, locale_selector=select_locale)
    # Flask-Babel's own template callables find the request's catalogue through its context
    # stack on every `_()`: fifty times a folder page, a fifth of its time (issue 17).  These
    # take it from the page's context, where the processor below puts it once per page (a
    # template rendered without it, e.g. an imported macro, still asks Flask-Babel).
    app.jinja_env.install_gettext_callables(  # type: ignore[attr-defined]
        gettext=_page_gettext, ngettext=_page_ngettext, pgettext=_page_pgettext,
        npgettext=_page_npgettext, newstyle=True)
    app.jinja_env.globals.update({"_": _page_text, "gettext": _page_text, "ngettext": _page_ntext})
    # {% trans %} blocks are extracted with their whitespace collapsed (babel.cfg): render them so.
    app.jinja_env.policies["ext.i18n.trimmed"] = True
    app.register_blueprint(bp)

    @app.context_processor
    def _languages() -> dict[str, Any]:
        # Back to this page after switching; a page drawn for a POST goes back to the inbox.
        here = request.full_path.rstrip("?") if request.method == "GET" else "/"
        catalogue = translations()
        return {"page_lang": current(), "languages": NAMES, "lang_next": here,
                "language_links": switch_links(here),
                "folder_names": folder_names(catalogue), PAGE_TRANSLATIONS: catalogue}


def switch_links(here: str) -> list[tuple[str, str, str]]:
    """(code, name, the switcher's URL back to `here`) of each language: one url_for for all
    four (each builds and quotes `next`, a tenth of a millisecond a page, issue 17).  A code
    is a path segment of letters, which url_for writes as it is, so only that part differs."""
    head, mark, query = url_for("i18n.switch", code="_", next=here).partition("?")
    if not head.endswith("/_"):
        return [(code, name, url_for("i18n.switch", code=code, next=here)) for code, name in NAMES.items()]
    return [(code, name, f"{head[:-1]}{code}{mark}{query}") for code, name in NAMES.items()]


def translations() -> Any:
    """This request's catalogue (Flask-Babel's), looked up once per request: each
    get_translations walks Flask-Babel's context stack again (issue 17)."""
    if not has_request_context():
        return get_translations()
    if "page_translations" not in g:
        g.page_translations = get_translations()
    return g.page_translations


__all__ = ["LANGUAGES", "NAMES", "current", "folder_names", "incident_text", "install", "locale",
           "public_text", "switch_links", "translations"]
