"""The one typed configuration of the service.

`Settings` is the whole schema: every setting has a type, a default and a line
of documentation.  `load_settings` layers the sources, lowest first:
defaults, then an optional TOML file, then `FALLBACK_*` environment variables,
then command-line flags, and validates the result once, failing fast with a
one-line `ConfigError` that names the setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fallback.errors import ConfigError

ENV_PREFIX = "FALLBACK_"
KIB = 1024
MIB = 1024 * KIB


def setting(default: Any, doc: str, unit: str | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"doc": doc, "unit": unit, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # Where state lives.
    data_dir: Path = setting(Path("./fallback-data"),
                             "Directory for the embedded Redis and runtime files")
    redis_url: str | None = setting(
        None,
        "Redis to use (redis://, rediss://, unix://); unset: the embedded redis-server of `fallback up`",
        secret=True,
    )
    redis_server: str = setting("redis-server", "redis-server binary for the embedded Redis")
    redis_maxmemory: str | None = setting(None,
                                          "maxmemory of the embedded Redis (e.g. 4gb); unset: no limit")
    # The SMTP receiver.
    hostname: str | None = setting(None, "Name in the SMTP greeting and Received: lines; unset: hostname")
    smtp_host: str = setting("127.0.0.1", "Address the SMTP receiver listens on (0.0.0.0 for all)")
    smtp_port: int = setting(2525, "SMTP receiver port")
    max_message_size: int = setting(
        50 * MIB, "Largest message accepted (SIZE and actual), bytes; suffixes KiB/MiB", unit="bytes")
    max_recipients: int = setting(100, "Most RCPT TO per message; more get 452 4.5.3")
    max_connections: int = setting(1000, "Concurrent SMTP connections in total; more get 421 4.7.0")
    max_connections_per_ip: int = setting(20, "Concurrent SMTP connections from one client IP")
    max_commands: int = setting(1000, "Times one SMTP command may be given on one connection")
    connection_timeout: float = setting(600.0, "Whole-connection time limit, seconds", unit="seconds")
    idle_timeout: float = setting(300.0, "Idle time allowed between SMTP commands, seconds", unit="seconds")
    tls_cert: Path | None = setting(None, "PEM certificate for STARTTLS (with tls_key)")
    tls_key: Path | None = setting(None, "PEM private key for STARTTLS (with tls_cert)")
    # The webmail.
    http_host: str = setting("127.0.0.1", "Address the webmail listens on")
    http_port: int = setting(8080, "Webmail port")
    # Directory and passwords.
    directory_buckets: int = setting(65536, "Hash buckets of the user directory (fixed at first use)")
    password_scheme: str = setting("ARGON2ID", "Scheme used to hash plain-text passwords on import")
    # Logging.
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING, ERROR")
    mail_log: str = setting("-", "Mail log destination: - for stderr, or a file path")
    demo: bool = setting(False, "Provision a demo mailbox at start (fallback up)")

    def public_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = redact_url(str(value))
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def redact_url(url: str) -> str:
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


_SIZE_UNITS = {"": 1, "b": 1, "k": KIB, "kb": KIB, "kib": KIB, "m": MIB, "mb": MIB, "mib": MIB,
               "g": 1024 * MIB, "gb": 1024 * MIB, "gib": 1024 * MIB}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 52428800, 50MiB, 512KiB)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 60, 90s, 10m, 5d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `Path` -> Path."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return typing.cast(type, hint)


def _convert(f: dataclasses.Field[Any], hint: Any, raw: Any) -> Any:
    if raw is None:
        return None
    base = _base_type(hint)
    unit = f.metadata.get("unit")
    if isinstance(raw, str):
        text = raw.strip()
        if text == "" and base is not str:
            return None
        if base is bool:
            if text.lower() in {"1", "true", "yes", "on"}:
                return True
            if text.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"not a boolean: {raw!r} (use true or false)")
        if unit == "bytes":
            return parse_size(text)
        if unit == "seconds":
            return parse_duration(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is Path:
            return Path(text)
        return text
    if base is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if base is Path and isinstance(raw, str | os.PathLike):
        return Path(raw)
    if base in (int, float, bool, str) and not isinstance(raw, base):
        raise ValueError(f"expected {base.__name__}, got {raw!r}")
    return raw


def _field_hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Defaults < TOML < FALLBACK_* env < flags; validated once."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    hints = _field_hints()
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_read_toml(Path(path), fields))

    for name in fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = (key, env[key])
    for name, raw in flags.items():
        if name in fields:
            values[name] = ("--" + name.replace("_", "-"), raw)

    converted: dict[str, Any] = {}
    for name, (source, raw) in values.items():
        try:
            converted[name] = _convert(fields[name], hints[name], raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    settings = Settings(**converted)
    validate(settings)
    return settings


def _read_toml(path: Path, fields: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    out: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = (f"{path}: {key}", value)
    return out


_PORT_FIELDS = ("smtp_port", "http_port")
_POSITIVE_FIELDS = (
    "max_message_size", "max_recipients", "max_connections", "max_connections_per_ip",
    "max_commands", "connection_timeout", "idle_timeout", "directory_buckets",
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def validate(s: Settings) -> None:
    """Fail fast on combinations no process could run with."""
    from fallback.passwords import HASHABLE_SCHEMES  # local: passwords imports heavy libraries

    for name in _PORT_FIELDS:
        port = getattr(s, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name}: {port} is not a port number (0-65535)")
    for name in _POSITIVE_FIELDS:
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("tls_cert and tls_key must be given together")
    for name in ("tls_cert", "tls_key"):
        p = getattr(s, name)
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{name}: {p} is not a readable file")
    if s.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(f"log_level: {s.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    if s.password_scheme.upper() not in HASHABLE_SCHEMES:
        raise ConfigError(
            f"password_scheme: {s.password_scheme!r} is not one of {', '.join(HASHABLE_SCHEMES)}"
        )
    if s.redis_url is not None and not re.match(
        r"^(redis|rediss|unix|redis\+cluster|redis\+sentinel)://", s.redis_url
    ):
        raise ConfigError(
            f"redis_url: {redact_url(s.redis_url)!r} must start with redis://, rediss:// or unix://"
        )


def settings_table() -> str:
    """The README's configuration table, generated so docs and code cannot drift."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = "unset" if default is None else str(default)
        if f.metadata.get("unit") == "bytes" and isinstance(default, int):
            shown = f"{default // MIB} MiB" if default % MIB == 0 else str(default)
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | {shown} "
            f"| {f.metadata['doc']} |"
        )
    return "\n".join(rows)
