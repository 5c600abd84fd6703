"""The README's configuration table is generated from the settings schema and must stay current."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fallback.cli import build_parser
from fallback.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- settings-table:[^\n]*-->\n)(.*?)(<!-- end settings-table -->)", re.DOTALL)


def cli_flags() -> set[str]:
    """Every long option of every (sub)command of `fallback`."""
    found: set[str] = set()
    todo = [build_parser()]
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            found.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


def table() -> str:
    return settings_table(cli_flags())


def test_readme_settings_table_is_current() -> None:
    m = _BLOCK.search(README.read_text())
    assert m, "README lost its settings-table markers"
    assert m.group(2).strip() == table().strip(), (
        "README configuration table is stale: run "
        "`.venv/bin/python -m tests.test_readme` to regenerate it"
    )


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(_BLOCK.sub(lambda m: m.group(1) + table() + "\n" + m.group(3), text))
