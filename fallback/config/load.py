"""Filling the settings from their sources, lowest first: defaults, an optional TOML
file, `FALLBACK_*` environment variables, then command-line flags; validated once.

Also the two ways settings leave a process: as `FALLBACK_*` variables for a
child (gunicorn) and as the README's generated configuration table.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fallback.config.checks import validate
from fallback.config.schema import ENV_PREFIX, MIB, Settings
from fallback.config.units import parse_duration, parse_size
from fallback.errors import ConfigError


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
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"not a whole number: {raw!r}")
            return int(text)
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"not a number: {raw!r}") from None
        if base is Path:
            return Path(text)
        return text
    if base in (int, float) and isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    if base is float and isinstance(raw, int):
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
    workers = converted.get("workers")
    if workers is not None and workers >= 0:
        # Shorthand for both process pools; a pool given on its own wins.
        converted.setdefault("smtp_workers", workers)
        converted.setdefault("web_workers", workers or os.cpu_count() or 1)
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


def settings_table(flags: set[str] | None = None) -> str:
    """The README's configuration table, generated so docs and code cannot drift.

    `flags` is every option string the CLI accepts; a setting without one is
    shown as environment/TOML only (secrets, on purpose, have no flag).
    """
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = "unset" if default is None else str(default)
        if f.metadata.get("unit") == "bytes" and isinstance(default, int):
            if default and default % (1024 * MIB) == 0:
                shown = f"{default // (1024 * MIB)} GiB"
            else:
                shown = f"{default // MIB} MiB" if default % MIB == 0 else str(default)
        flag = "--" + f.name.replace("_", "-")
        shown_flag = f"`{flag}`" if flags is None or flag in flags else "—"
        rows.append(
            f"| {shown_flag} | `{ENV_PREFIX}{f.name.upper()}` | {shown} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)


def settings_env(s: Settings) -> dict[str, str]:
    """The settings as FALLBACK_* variables, for a child process (gunicorn) to load again."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[ENV_PREFIX + f.name.upper()] = str(value)
    return out

