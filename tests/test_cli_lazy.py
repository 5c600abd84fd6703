"""`fallback COMMAND` loads only that command's module: a cron's `fallback check` or the
end of an outage's `fallback reconcile` does not pay for LDAP, DNS and web libraries."""

from __future__ import annotations

import subprocess
import sys

from fallback.cli import build_parser
from fallback.commands import COMMANDS


def loaded_after(argv: list[str]) -> set[str]:
    code = ("import sys; from fallback.cli import build_parser; "
            f"build_parser({argv!r}); print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_one_command_loads_only_its_module() -> None:
    mods = loaded_after(["reconcile", "--all"])
    assert "fallback.commands.reconcile" in mods
    assert not {"fallback.commands.provision", "fallback.commands.dns", "ldap3", "dns.message"} & mods


def test_help_and_a_mistyped_command_see_every_command() -> None:
    for argv in ([], ["--help"], ["reconsile"]):
        parser = build_parser(argv)
        choices = next(a for a in parser._actions if a.dest == "command").choices
        assert choices is not None and tuple(choices) == COMMANDS
