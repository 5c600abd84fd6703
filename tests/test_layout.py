"""The layout docs/architecture.md draws, held against the code.

Components are the packages of fallback/; what every component shares sits
at the top.  Each component may import only what the component map allows,
so an import that would turn the layering around fails here first.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"addresses", "config", "embedded", "errors", "ids", "keys", "maillog", "redisconn"}
RUNNER = {"service", "webserver", "eventloop"}  # the process runner: starts the components
# component -> the components it may import (besides the shared modules).  docs/architecture.md.
ALLOWED = {
    "shared": set(),
    "mailbox": set(),
    "queues": {"mailbox"},
    "reconcile": {"mailbox"},
    "ops": {"mailbox", "queues"},
    "intake": {"mailbox", "queues", "ops"},
    "runner": {"intake", "mailbox", "queues", "ops"},
    "cli": {"intake", "mailbox", "queues", "reconcile", "ops", "runner"},
    "web": {"intake", "mailbox", "queues", "ops"},
}
PACKAGES = ("fallback.mailbox", "fallback.queues", "fallback.reconcile", "fallback.ops", "fallback.intake")


def component(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "web":
        return "web"
    if len(parts) == 1 or parts[1] in SHARED or parts[1] in ("__init__", "__main__"):
        return "shared" if parts[-1] != "__main__" else "cli"
    if parts[1] in ("cli", "commands"):
        return "cli"
    if parts[1] in RUNNER:
        return "runner"
    return parts[1]


def modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("fallback", "web"):
        for path in sorted((ROOT / top).rglob("*.py")):
            out.append((".".join(path.relative_to(ROOT).with_suffix("").parts), path))
    return out


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES or node.module in ("fallback", "web"):
                found += [f"{node.module}.{a.name}" for a in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [name for name in found if name.split(".")[0] in ("fallback", "web")]


def test_each_component_imports_only_what_the_map_allows():
    wrong = []
    for module, path in modules():
        mine = component(module)
        for name in imports(path):
            theirs = component(name)
            if theirs not in (mine, "shared") and theirs not in ALLOWED[mine]:
                wrong.append(f"{module} ({mine}) imports {name} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_fallback_never_imports_web():
    assert not [(m, n) for m, p in modules() if m.startswith("fallback") for n in imports(p)
                if n.startswith("web")]


def test_few_flat_modules_and_none_too_long():
    flat = sorted(p.name for p in (ROOT / "fallback").glob("*.py"))
    assert len(flat) <= 14, flat
    long = [(m, n) for m, p in modules() if (n := len(p.read_text().splitlines())) > 450]
    assert not long, long


def test_every_module_says_what_it_owns():
    missing = [m for m, p in modules()
               if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, missing


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout"):readme.index("## Documentation")]
    missing = [m for m, p in modules()
               if m.startswith("fallback.") and p.stem != "__init__" and p.parent.name != "commands"
               and p.stem != "__main__" and not re.search(rf"\b{p.stem}\b", block)]
    assert not missing, missing

