"""The webmail in English, French, German and Spanish (web/i18n.py, web/translations/).

The catalogue checks run the real extraction (babel.cfg over web/*.py and web/templates/*.html)
and fail when a string is missing, empty, fuzzy or has other placeholders in a language, and
when a template shows text outside a gettext call.  The page checks use the real app on the
test redis-server (Flask client) in each language; one test drives the real Chromium with a
German and a French browser locale, axe-core and a 390 px screen.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
import pytest
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

from fallback.mailbox import fields
from fallback.mailbox.contacts import MAX_QUERY
from fallback.webserver import WebComponent
from tests.servers import ROOT, free_port
from tests.test_web_a11y import check
from tests.test_web_browser import ARGS, CHROMIUM, DESKTOP, log_in, smtp_send
from tests.test_web_compose import compose_page
from tests.webutil import SECRET, csrf, log_in_as, make_app, put_message, simple

ALICE = "alice@example.com"
LANGS = ("fr", "de", "es")
TRANSLATIONS = ROOT / "web" / "translations"
KEYWORDS = {**DEFAULT_KEYWORDS, "lazy_gettext": None, "lazy_ngettext": (1, 2)}
PLACEHOLDER = re.compile(r"%\((\w+)\)s")
# Words each language must show on the inbox page, and English that must not be left there.
INBOX_WORD = {"en": "Inbox", "fr": "Boîte de réception", "de": "Posteingang", "es": "Bandeja de entrada"}
DRAFTS_WORD = {"en": "Drafts", "fr": "Brouillons", "de": "Entwürfe", "es": "Borradores"}
LOG_OUT = {"en": "Log out", "fr": "Se déconnecter", "de": "Abmelden", "es": "Cerrar sesión"}


def extracted() -> dict[str | tuple[str, ...], list[str]]:
    """Every msgid babel.cfg extracts, with the files it comes from."""
    with open(ROOT / "babel.cfg") as f:
        method_map, options_map = parse_mapping_cfg(f)
    found: dict[str | tuple[str, ...], list[str]] = {}
    for filename, _lineno, message, _comments, _context in extract_from_dir(
            str(ROOT), method_map, options_map, keywords=KEYWORDS):
        found.setdefault(message, []).append(filename)
    return found


def catalogue(lang: str) -> Any:
    with open(TRANSLATIONS / lang / "LC_MESSAGES" / "messages.po", "rb") as f:
        return read_po(f, locale=lang)


def test_every_extracted_string_is_translated_in_every_language() -> None:
    source = extracted()
    assert len(source) > 150  # the extraction really ran over the pages
    files = {f for where in source.values() for f in where}
    assert not [f for f in files if f.startswith(("web/console", "web/templates/admin"))], \
        "the admin console is for operators and stays English (babel.cfg)"
    assert "web/templates/base.html" in files and "web/compose.py" in files
    for lang in LANGS:
        cat = catalogue(lang)
        problems = []
        for msgid in source:
            key = msgid[0] if isinstance(msgid, tuple) else msgid
            entry = cat.get(key)
            if entry is None:
                problems.append(f"missing: {key!r}")
                continue
            if entry.fuzzy:
                problems.append(f"fuzzy: {key!r}")
            strings = entry.string if isinstance(entry.string, tuple) else (entry.string,)
            if isinstance(msgid, tuple) != isinstance(entry.id, tuple) or not all(strings):
                problems.append(f"untranslated: {key!r}")
                continue
            wanted = set(PLACEHOLDER.findall(" ".join(msgid) if isinstance(msgid, tuple) else msgid))
            for s in strings:
                if set(PLACEHOLDER.findall(s)) != wanted:
                    problems.append(f"placeholders differ: {key!r} -> {s!r}")
        stale = sorted(str(m.id) for m in cat if m.id and m.id not in source)
        problems += [f"not in the source any more: {s}" for s in stale]
        assert problems == [], f"{lang}: run `make translations` and translate:\n" + "\n".join(problems)


def test_the_check_fails_on_a_string_missing_from_a_catalogue(tmp_path: Path) -> None:
    """The test above can fail: a template with a new string is not in the French catalogue."""
    (tmp_path / "web" / "templates").mkdir(parents=True)
    (tmp_path / "web" / "templates" / "new.html").write_text("<p>{{ _('A brand new sentence') }}</p>")
    with open(ROOT / "babel.cfg") as f:
        method_map, options_map = parse_mapping_cfg(f)
    new = [m for _, _, m, _, _ in extract_from_dir(str(tmp_path), method_map, options_map,
                                                   keywords=KEYWORDS)]
    assert new == ["A brand new sentence"]
    assert catalogue("fr").get("A brand new sentence") is None


# -- no text outside gettext in the templates ----------------------------------------------------

GETTEXT_CALLS = {"_", "gettext", "ngettext"}
SHOWN_ATTRS = {"title", "placeholder", "aria-label", "alt", "label"}
# Shown as they are in every language: the symbols of the keyboard help, the flag's star.
ALLOWED = {"c", "j", "k", "o", "r", "a", "f", "#", "?", "/"}
MARK = "\x00"  # around the number of a {{ }}
BLOCK = "\x01"  # a {% %}


def _bare_strings(tokens: list[tuple[str, str]]) -> list[str]:
    """The string literals of one {{ }} that would be printed: not gettext's arguments, nor a
    call's, a subscript's, a dict key or a comparison's."""
    # env.lex gives operators as ("operator", "("): name them by their text.
    tokens = [(value if kind == "operator" else kind, value) for kind, value in tokens]
    out, depth, gettext_depth = [], 0, None
    for i, (kind, value) in enumerate(tokens):
        if kind in ("(", "["):
            depth += 1
            if kind == "(" and i and tokens[i - 1] == ("name", tokens[i - 1][1]) and \
                    tokens[i - 1][1] in GETTEXT_CALLS and gettext_depth is None:
                gettext_depth = depth
        elif kind in (")", "]"):
            if gettext_depth == depth:
                gettext_depth = None
            depth -= 1
        elif kind == "string" and depth == 0:
            after = tokens[i + 1][0] if i + 1 < len(tokens) else ""
            before = tokens[i - 1][0] if i else ""
            if after in (":", "==", "!=") or before in ("==", "!=") or \
                    (after == "name" and tokens[i + 1][1] in ("in", "not")):
                continue
            out.append(ast.literal_eval(value))
    return out


def _flatten(source: str, env: jinja2.Environment) -> tuple[str, list[list[str]]]:
    """The template as HTML with each {{ }} and {% %} replaced by a marker (the strings each
    {{ }} would print kept aside), and {% trans %} blocks left out: they are translated."""
    html, printed = [], []
    in_trans, block, expr = False, [], None
    for _, kind, value in env.lex(source):
        if kind == "whitespace":
            continue
        if kind == "block_begin":
            block = []
        elif kind == "block_end":
            name = block[0][1] if block else ""
            if name == "trans":
                in_trans = True
            elif name == "endtrans":
                in_trans = False
            html.append(BLOCK)
            block = []
        elif kind == "variable_begin":
            expr = []
        elif kind == "variable_end":
            if not in_trans:
                printed.append(_bare_strings(expr or []))
                html.append(f"{MARK}{len(printed) - 1}{MARK}")
            expr = None
        elif kind == "data":
            if not in_trans:
                html.append(value)
        elif expr is not None:
            expr.append((kind, value))
        else:
            block.append((kind, value))
    return "".join(html), printed


def _visible_problem(text: str, printed: list[list[str]]) -> list[str]:
    found = []
    for n in re.findall(rf"{MARK}(\d+){MARK}", text):
        found += [s for s in printed[int(n)] if re.search(r"[^\W\d_]{2}", s)]
    rest = re.sub(rf"{MARK}\d+{MARK}|{BLOCK}", " ", text)
    letters = "".join(ch for ch in rest if not (ch.isspace() or unicodedata.category(ch)[0] in "PS"))
    if letters and rest.strip() not in ALLOWED:
        found.append(rest.strip())
    return found


class _TextFinder(HTMLParser):
    def __init__(self, printed: list[list[str]]) -> None:
        super().__init__(convert_charrefs=True)
        self.printed, self.problems, self.skip = printed, [], 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "kbd"):
            self.skip += 1
        for name, value in attrs:
            if name in SHOWN_ATTRS and value:
                self.problems += [f"{tag} {name}={p!r}" for p in _visible_problem(value, self.printed)]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "kbd"):
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.problems += [f"text {p!r}" for p in _visible_problem(data, self.printed)]


def bare_text(source: str) -> list[str]:
    env = jinja2.Environment(extensions=["jinja2.ext.i18n"], autoescape=True)
    html, printed = _flatten(source, env)
    finder = _TextFinder(printed)
    finder.feed(html)
    finder.close()
    return finder.problems


def test_templates_show_no_text_outside_gettext() -> None:
    templates = sorted((ROOT / "web" / "templates").glob("*.html"))
    assert len(templates) >= 10
    problems = {t.name: bare_text(t.read_text()) for t in templates}
    assert {k: v for k, v in problems.items() if v} == {}


def test_the_bare_text_check_finds_text_and_printed_strings() -> None:
    assert bare_text("<p>{{ _('Fine') }} · {{ count }}</p>") == []
    assert bare_text("<p>{% trans %}Fine {{ x }}{% endtrans %}</p><kbd>j</kbd>") == []
    assert bare_text("<p>Hello {{ user }}</p>") == ["text 'Hello'"]
    assert bare_text('<input placeholder="Search">') == ["input placeholder='Search'"]
    assert bare_text("<h1>{{ 'Inbox' if folder == 'INBOX' else folder }}</h1>") == ["text 'Inbox'"]
    assert bare_text("<b>{{ {'read': 'Mark read'}[a] }}</b>") == ["text 'Mark read'"]
    assert bare_text("<b>{{ {'read': _('Mark read')}[a] }}</b><i class=\"{{ 'unread' }}\"></i>") == []


# -- the language a page is shown in -------------------------------------------------------------

def test_accept_language_picks_the_best_of_ours_and_the_cookie_overrides_it(client) -> None:
    fr = client.get("/login", headers={"Accept-Language": "fr-CH, fr;q=0.9, en;q=0.5"})
    assert fr.status_code == 200
    assert '<html lang="fr">' in fr.text and "Connectez-vous à votre boîte aux lettres de secours" in fr.text
    assert "Log in to your emergency mailbox" not in fr.text
    assert 'aria-current="true">Français</a>' in fr.text
    # Nothing of ours: English; a language we have, even second, wins over one we lack.
    assert '<html lang="en">' in client.get("/login", headers={"Accept-Language": "ja"}).text
    assert '<html lang="es">' in client.get("/login", headers={"Accept-Language": "ja, es;q=0.4"}).text

    switched = client.get("/lang/de?next=/status", headers={"Accept-Language": "fr"})
    assert switched.status_code == 302 and switched.headers["Location"] == "/status"
    cookie = switched.headers["Set-Cookie"]
    assert cookie.startswith("lang=de;") and "Max-Age=31536000" in cookie and "SameSite=Lax" in cookie
    status = client.get("/status", headers={"Accept-Language": "fr"})
    assert '<html lang="de">' in status.text and "Dienststatus" in status.text
    # A cookie naming a language we do not have is ignored.
    client.set_cookie("lang", "xx")
    assert '<html lang="fr">' in client.get("/login", headers={"Accept-Language": "fr"}).text


@pytest.mark.parametrize("target", ["//evil.test/x", "https://evil.test/", "/\\evil.test", "", "status"])
def test_the_switcher_goes_back_only_to_our_own_pages(client, target: str) -> None:
    resp = client.get("/lang/es", query_string={"next": target})
    assert resp.status_code == 302 and resp.headers["Location"] == "/"
    assert resp.headers["Set-Cookie"].startswith("lang=es;")


def test_an_unknown_language_is_a_translated_404_and_sets_nothing(client) -> None:
    client.set_cookie("lang", "fr")
    resp = client.get("/lang/xx?next=/status")
    assert resp.status_code == 404 and "Set-Cookie" not in resp.headers
    assert "Il n&#39;y a rien ici (ou ce n&#39;est pas à vous)." in resp.text
    assert "Introuvable" in resp.text


def test_every_page_renders_in_every_language(client, r) -> None:
    csrf_token = log_in_as(client, ALICE)
    msg_id = put_message(r, ALICE, simple("Quarterly plan"))
    put_message(r, ALICE, simple("Old one"), folder=fields.TRASH)
    page_paths = ["/", "/folder/sent", "/folder/drafts", "/folder/trash", f"/message/{msg_id}",
                  "/compose", f"/compose?reply={msg_id}", "/folder/trash/empty", "/status", "/nothing-here"]
    for lang in ("en", *LANGS):
        client.set_cookie("lang", lang)
        for path in page_paths:
            resp = client.get(path)
            assert resp.status_code == (404 if path == "/nothing-here" else 200), (lang, path)
            assert f'<html lang="{lang}">' in resp.text, (lang, path)
            assert "Traceback" not in resp.text
            if path != "/status":
                assert LOG_OUT[lang] in resp.text and DRAFTS_WORD[lang] in resp.text, (lang, path)
        assert INBOX_WORD[lang] in client.get("/").text
    client.set_cookie("lang", "de")
    message = client.get(f"/message/{msg_id}").text
    # The Date header with German day and month names (the reader's zone is not known: UTC).
    assert "Mo., 23. Nov. 2026, 10:00 UTC" in message
    reply = client.get(f"/compose?reply={msg_id}").text
    assert "schrieb ann@remote.test:" in reply and "Antworten" in reply
    client.set_cookie("lang", "es")
    confirm = client.get("/folder/trash/empty").text
    assert "Esto elimina definitivamente el 1 mensaje de la papelera." in confirm
    assert csrf_token


def test_messages_from_the_server_are_translated(client, r, settings, mailboxes) -> None:
    """Form errors, the CSRF page, the send limit, the JSON of the suggestions, the login."""
    client.set_cookie("lang", "fr")
    login = client.get("/login").text
    wrong = client.post("/login", data={"csrf_token": csrf(login), "username": ALICE, "password": "nope"})
    assert wrong.status_code == 401 and "Adresse ou mot de passe incorrect." in wrong.text
    log_in_as(client, ALICE)
    form = compose_page(client)
    bad = client.post("/compose", data={**form, "to": "not an address", "cc": "", "bcc": "",
                                        "subject": "s", "body": "kept"},
                      content_type="multipart/form-data")
    assert bad.status_code == 400
    assert ("À : &#39;not an address&#39; n&#39;est pas une adresse e-mail. Rien n&#39;a été envoyé."
            in bad.text)
    assert ">kept</textarea>" in bad.text  # nothing typed is lost
    expired = client.post("/folder/inbox/bulk", data={"csrf_token": "wrong", "action": "read"})
    assert expired.status_code == 400 and "Ce formulaire a expiré" in expired.text
    long_q = client.get("/contacts", query_string={"q": "x" * (MAX_QUERY + 1)})
    assert long_q.status_code == 400
    assert long_q.json == {"error": f"Saisissez au plus {MAX_QUERY} caractères pour rechercher une adresse."}
    at_limit = client.get("/contacts", query_string={"q": "x" * MAX_QUERY})
    assert at_limit.status_code == 200 and at_limit.json == []

    limited = make_app(settings, r, send_limit_per_hour=2).test_client()
    limited.set_cookie("lang", "de")
    log_in_as(limited, ALICE)
    resp = limited.post("/compose", data={**compose_page(limited), "to": "a@remote.test, b@remote.test, "
                                          "c@remote.test", "cc": "", "bcc": "", "subject": "s",
                                          "body": "b"}, content_type="multipart/form-data")
    assert resp.status_code == 429
    assert ("Diese Nachricht hat 3 Empfänger, mehr als die 2 pro Stunde, die dieser Dienst während "
            "des Ausfalls erlaubt. Senden Sie sie an weniger Empfänger. Es wurde nichts gesendet."
            in resp.text)


def test_the_default_incident_text_is_translated_and_the_operators_is_not(settings, r, mailboxes) -> None:
    fr = {"Accept-Language": "fr"}
    default = make_app(settings, r).test_client().get("/status", headers=fr).text
    assert "Notre système de messagerie principal est en panne. Nous travaillons à le rétablir." in default
    own = make_app(settings, r, incident_message="Panne chez Example, retour prévu à 18 h.").test_client()
    assert "Panne chez Example, retour prévu à 18 h." in own.get("/login", headers=fr).text


def test_the_login_throttle_answers_in_the_chosen_language(settings, r, mailboxes) -> None:
    client = make_app(settings, r, login_source_failures=1).test_client()
    client.set_cookie("lang", "es")
    # The first delay after a failure is 1 s: on a slow machine the next try may come after it,
    # so try until the throttle answers (bounded).
    for _ in range(8):
        page = client.get("/login").text
        resp = client.post("/login", data={"csrf_token": csrf(page), "username": ALICE, "password": "x"})
        if resp.status_code == 429:
            break
        if resp.status_code == 503:  # a loaded machine: the password check took too long
            assert "La comprobación de su contraseña ha tardado demasiado." in resp.text
            continue
        assert resp.status_code == 401 and "Dirección o contraseña incorrectas." in resp.text
    assert resp.status_code == 429
    assert re.search(r"Demasiados intentos\. Inténtelo de nuevo dentro de \d+ segundos?\.", resp.text)
    assert f'value="{ALICE}"' in resp.text  # the address typed is kept


def test_fallbacks_own_error_texts_are_mapped(web_app) -> None:
    """fallback/ raises English; web.i18n.public_text says it in the page's language."""
    from fallback.errors import InputError
    from fallback.mailbox import contacts
    from web.i18n import public_text

    with web_app.test_request_context("/", headers={"Accept-Language": "es"}):
        with pytest.raises(InputError) as long_query:
            contacts.check_query("x" * (MAX_QUERY + 1))
        assert public_text(long_query.value) == (
            f"Escriba como máximo {MAX_QUERY} caracteres para buscar una dirección.")
        loop = InputError("alias loop", public=(
            "Mail to team@example.com cannot be delivered now: that address is an alias that "
            "loops. Nothing was sent; please tell your mail administrator."))
        assert public_text(loop).startswith("El correo para team@example.com no se puede entregar ahora")
        unknown = InputError("other", public="Some text we do not know.")
        assert public_text(unknown) == "Some text we do not know."


def test_without_compiled_catalogues_the_pages_are_english(settings, r, mailboxes, tmp_path) -> None:
    app = make_app(settings, r)
    app.extensions["babel"].translation_directories = [str(tmp_path)]  # a clone before compiling
    client = app.test_client()
    resp = client.get("/login", headers={"Accept-Language": "de"})
    assert resp.status_code == 200 and "Log in to your emergency mailbox" in resp.text


# -- in the browser -----------------------------------------------------------------------------

@pytest.fixture
def webmail(settings: Any, receiver: Any) -> Iterator[str]:
    s = replace(settings, secret_key=SECRET, http_port=free_port(), cookie_secure=False, web_workers=1,
                web_threads=4)
    component = WebComponent(s, s.redis_url or "")
    component.start_sync()
    yield f"http://127.0.0.1:{component.port}"
    component.stop_sync()


@pytest.mark.browser
@pytest.mark.slow
def test_german_and_french_browsers_get_their_language(webmail, receiver, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    smtp_send(receiver.port, [(ALICE, simple("Quartalsplanung", sender="Ann <ann@remote.test>"))])
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            for locale, lang, inbox, login_title in (
                    ("de-DE", "de", "Posteingang", "Bei Ihrem Notfall-Postfach anmelden"),
                    ("fr-FR", "fr", "Boîte de réception",
                     "Connectez-vous à votre boîte aux lettres de secours")):
                context = browser.new_context(locale=locale, viewport=DESKTOP, bypass_csp=True)
                page = context.new_page()
                page.goto(f"{webmail}/login")
                assert page.locator("html").get_attribute("lang") == lang
                assert page.locator("h1").inner_text() == login_title
                check(page, f"{lang} login page")
                log_in(page, webmail, ALICE)
                assert page.locator("html").get_attribute("lang") == lang
                assert page.locator("h1").inner_text() == inbox
                assert page.locator(".list .subject").all_inner_texts() == ["Quartalsplanung"]
                check(page, f"{lang} inbox")
                page.screenshot(path=str(artifacts / f"i18n-inbox-{lang}.png"))
                context.close()
            # The switcher, without any script: German browser, Spanish chosen, remembered.
            context = browser.new_context(locale="de-DE", viewport=DESKTOP, java_script_enabled=False)
            page = context.new_page()
            page.goto(f"{webmail}/status")
            page.get_by_role("link", name="Español").click()
            page.wait_for_url(f"{webmail}/status")
            assert page.locator("html").get_attribute("lang") == "es"
            assert page.locator("h1").inner_text() == "Estado del servicio"
            page.goto(f"{webmail}/login")
            assert page.locator("h1").inner_text() == "Inicie sesión en su buzón de emergencia"
            context.close()
        finally:
            browser.close()
