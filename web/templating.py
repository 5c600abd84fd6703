"""The environment the webmail's templates are drawn with: compiled once per language, with
each constant `_('text')` written into the compiled page, and `url_for` built once per URL.

A page's template calls `_()` some forty times, each a call through Jinja's context into the
catalogue, and `url_for` some fifteen times, each a werkzeug route build: together about half
of drawing a base.html page (issue 17).  Both give the same text on every request of a
language, so:

- `PageEnvironment` keeps one overlay of Flask's environment per language (its own cache of
  compiled templates, everything else shared).  Its `ConstantTexts` extension replaces
  `_('text')` -- exactly one string, nothing else -- by that text translated, as `_()` gives
  it (`Markup(translation) % {}`), marked safe, so Jinja writes it into the compiled code.
  Texts with variables, `ngettext` and `{% trans %}` blocks still run per request.  Only
  templates that autoescape are rewritten (there `_()` returns Markup; every template here
  does).  Outside a request, or for a language past `MAX_LANGUAGES`, the plain environment
  draws the page as before.
- `Links.url_for` keeps each URL the templates build, keyed on the request's script root,
  the endpoint and its arguments: with no host matching, no subdomains and no url_defaults
  (checked when installed) a relative URL depends on nothing else.  Bounded: a full memo
  starts over.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

from flask import Flask, has_request_context, request
from flask.sansio.app import App
from flask.templating import Environment as FlaskEnvironment
from flask_babel import get_locale
from jinja2 import Template
from jinja2.ext import Extension
from jinja2.lexer import (
    TOKEN_DOT,
    TOKEN_LPAREN,
    TOKEN_NAME,
    TOKEN_PIPE,
    TOKEN_RPAREN,
    TOKEN_STRING,
    Token,
    TokenStream,
)
from markupsafe import Markup

from web import i18n

# More than the webmail's four: select_locale names only those, force_locale may name others.
MAX_LANGUAGES = 16
# Distinct URLs kept (the language switcher's links carry the page's path, so a few per page).
MAX_LINKS = 4096


class ConstantTexts(Extension):
    """`_('text')` in an autoescaped template becomes `('translated'|safe)`, folded by Jinja
    into the compiled template: the translations are the environment's `page_translations`."""

    def filter_stream(self, stream: TokenStream) -> Iterable[Token]:
        translations = getattr(self.environment, "page_translations", None)
        if translations is None or not self.environment.autoescape(stream.name):  # type: ignore[operator]
            return stream
        return _rewritten(list(stream), translations)


def _rewritten(tokens: list[Token], translations: Any) -> Iterator[Token]:
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if (t.type == TOKEN_NAME and t.value == "_" and (i == 0 or tokens[i - 1].type != TOKEN_DOT)
                and [x.type for x in tokens[i + 1:i + 4]] == [TOKEN_LPAREN, TOKEN_STRING, TOKEN_RPAREN]):
            # What web.i18n's `_` returns for this text in an autoescaped template.
            text = str(Markup(translations.ugettext(tokens[i + 2].value)) % {})  # noqa: S704 -- our catalogues
            line = t.lineno
            yield from (Token(line, TOKEN_LPAREN, "("), Token(line, TOKEN_STRING, text),
                        Token(line, TOKEN_PIPE, "|"), Token(line, TOKEN_NAME, "safe"),
                        Token(line, TOKEN_RPAREN, ")"))
            i += 4
            continue
        yield t
        i += 1


class PageEnvironment(FlaskEnvironment):
    """Flask's environment, handing each template to the request's language's overlay."""

    def __init__(self, app: App, **options: Any) -> None:
        super().__init__(app, **options)
        self.languages: dict[str, PageEnvironment] = {}
        self.page_translations: Any = None

    def for_language(self) -> PageEnvironment | None:
        """This request's language's environment; None outside a request (or for too many)."""
        if self.overlayed or not has_request_context():
            return None
        code = str(get_locale())
        found = self.languages.get(code)
        if found is None and len(self.languages) < MAX_LANGUAGES:
            # A cache of its own (Jinja's default size, as Flask's): the templates this
            # environment compiled are without the texts.
            found = self.overlay(extensions=[ConstantTexts], cache_size=400)
            found.page_translations = i18n.translations()
            self.languages[code] = found
        return found

    def get_template(self, name: str | Template, parent: str | None = None,
                     globals: MutableMapping[str, Any] | None = None) -> Template:
        env = self.for_language()
        if env is None:
            return super().get_template(name, parent, globals)
        return env.get_template(name, parent, globals)

    def select_template(self, names: Iterable[str | Template], parent: str | None = None,
                        globals: MutableMapping[str, Any] | None = None) -> Template:
        env = self.for_language()
        if env is None:
            return super().select_template(names, parent, globals)
        return env.select_template(names, parent, globals)


class Links:
    """`url_for` for the templates, each relative URL built once (see the module's docstring)."""

    def __init__(self, app: Flask, limit: int = MAX_LINKS) -> None:
        self.app = app
        self.limit = limit
        self.built: dict[tuple[Any, ...], str] = {}
        url_map = app.url_map
        # Where a URL could depend on more than the script root, endpoint and arguments.
        self.plain = not (url_map.host_matching or url_map.default_subdomain
                          or any(r.subdomain for r in url_map.iter_rules())
                          or any(app.url_default_functions.values()))

    def url_for(self, endpoint: str, **values: Any) -> str:
        if not self.plain or endpoint.startswith(".") or "_external" in values or "_scheme" in values:
            return self.app.url_for(endpoint, **values)
        key = (request.script_root, endpoint, *sorted(values.items()))
        try:
            url = self.built.get(key)
        except TypeError:  # an argument the key cannot hold
            return self.app.url_for(endpoint, **values)
        if url is None:
            url = self.app.url_for(endpoint, **values)
            if len(self.built) >= self.limit:
                self.built.clear()
            self.built[key] = url
        return url


def install(app: Flask) -> None:
    """After every blueprint is registered (Links checks their url_defaults)."""
    app.jinja_env.globals["url_for"] = Links(app).url_for
