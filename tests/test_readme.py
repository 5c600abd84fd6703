"""The README's configuration table is generated from the settings schema and must stay current."""

from __future__ import annotations

import re
from pathlib import Path

from fallback.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- settings-table:[^\n]*-->\n)(.*?)(<!-- end settings-table -->)", re.DOTALL)


def test_readme_settings_table_is_current() -> None:
    m = _BLOCK.search(README.read_text())
    assert m, "README lost its settings-table markers"
    assert m.group(2).strip() == settings_table().strip(), (
        "README configuration table is stale: run "
        "`.venv/bin/python -m tests.test_readme` to regenerate it"
    )


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(_BLOCK.sub(lambda m: m.group(1) + settings_table() + "\n" + m.group(3), text))
