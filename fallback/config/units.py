"""Sizes and durations as people type them ("50MiB", "90s", "12h")."""

from __future__ import annotations

import re

from fallback.config.schema import KIB, MIB

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
