"""Secrets read from settings or files: the webmail's key, the admin and metrics tokens, and
the one reader for secret files (keys, tokens, passwords) that every setting ending in _file uses."""

from __future__ import annotations

from pathlib import Path

from fallback.config.schema import Settings
from fallback.errors import ConfigError

DEFAULT_SECRET_KEYS = ("", "change-me", "changeme", "secret", "dev", "demo")
MIN_SECRET_LENGTH = 32


def webmail_secret(s: Settings) -> str:
    """The webmail's secret key, from secret_key or secret_key_file; refuses a missing or default one.

    A guessable key would let anyone forge form tokens, so the webmail does not
    start without a real one; only demo mode (a throwaway local run) may go
    without, and `fallback up --demo` then makes a random one up.
    """
    value = s.secret_key
    if value is None and s.secret_key_file is not None:
        value = read_secret_file("secret_key_file", s.secret_key_file)
    if value is None or value.strip().lower() in DEFAULT_SECRET_KEYS:
        raise ConfigError(
            "secret_key: the webmail needs a secret key: set FALLBACK_SECRET_KEY or --secret-key-file "
            "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`), or run with --demo"
        )
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(f"secret_key: too short ({len(value)} characters, need {MIN_SECRET_LENGTH})")
    return value


def cookie_secure(s: Settings) -> bool:
    """Secure cookies unless explicitly turned off, or in demo mode on plain local HTTP."""
    return (not s.demo) if s.cookie_secure is None else s.cookie_secure


def read_secret_file(setting: str, path: Path | str, keep_spaces: bool = False) -> str:
    """The text of a file holding a key, token or password, stripped of its line ends (and,
    unless `keep_spaces`, of surrounding whitespace); a one-line error naming the setting."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc}") from None
    return text.strip("\r\n") if keep_spaces else text.strip()


def admin_token(s: Settings) -> str | None:
    """The admin API's bearer token from admin_token or admin_token_file; None: the API is off."""
    value = s.admin_token
    if value is None and s.admin_token_file is not None:
        value = read_secret_file("admin_token_file", s.admin_token_file)
    if value is not None and len(value) < 16:
        raise ConfigError(f"admin_token: too short ({len(value)} characters, need 16)")
    return value or None


def metrics_token(s: Settings) -> str | None:
    """The bearer token of metrics_token_file for non-loopback /metrics and /readyz clients;
    None when unset (loopback only)."""
    if s.metrics_token_file is None:
        return None
    value = read_secret_file("metrics_token_file", s.metrics_token_file)
    if len(value) < 16:
        raise ConfigError(f"metrics_token_file: the token in {s.metrics_token_file} is too short "
                          f"({len(value)} characters, need 16)")
    return value
