"""CSV output cannot run as a spreadsheet formula; JSON keeps the values as they are
(real mailboxes provisioned into the real Redis, `fallback affected` and the admin API)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from fallback.cli import main
from fallback.commands.affected import spreadsheet_cell
from tests.webutil import make_app

ADMIN_TOKEN = "admin-token-0123456789abcdef"
# Valid addresses that a spreadsheet would read as formulas, with one that it would not.
ROWS = [
    ("=1+2@example.com", "default", "=cmd@home.example"),
    ("+alice@example.com", "west", "+tag@home.example"),
    ("-bob@example.com", "default", "-2+3@home.example"),
    ("carol@example.com", "west", ""),
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def provisioned(r, redis_url, tmp_path: Path, capsys) -> None:
    src = tmp_path / "users.csv"
    src.write_text("address,password,mailstore,alternate\n"
                   + "".join(f"{a},{{PLAIN}}pw,{m},{alt}\n" for a, m, alt in ROWS))
    code, out, err = run(capsys, "provision", str(src), "--redis-url", redis_url)
    assert code == 0, out + err


def test_formula_cells_get_a_leading_quote(provisioned, redis_url, capsys) -> None:
    code, out, err = run(capsys, "affected", "--format", "csv", "--redis-url", redis_url)
    assert code == 0 and "4 affected mailbox(es)" in err
    rows = {row["address"]: row for row in csv.DictReader(io.StringIO(out))}
    assert len(rows) == len(ROWS)  # every mailbox listed, none lost to the quoting
    assert rows["'=1+2@example.com"] == {"address": "'=1+2@example.com", "domain": "example.com",
                                         "mailstore": "default", "alternate": "'=cmd@home.example"}
    assert rows["'+alice@example.com"]["alternate"] == "'+tag@home.example"
    assert rows["'-bob@example.com"]["alternate"] == "'-2+3@home.example"
    assert rows["carol@example.com"] == {"address": "carol@example.com", "domain": "example.com",
                                         "mailstore": "west", "alternate": ""}
    # No cell of the document starts a formula.
    for row in csv.reader(io.StringIO(out)):
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


def test_json_keeps_the_values_unchanged(provisioned, settings, r, redis_url, capsys) -> None:
    code, out, _ = run(capsys, "affected", "--format", "json", "--redis-url", redis_url)
    expected = {(a, m, alt) for a, m, alt in ROWS}
    assert code == 0 and {(d["address"], d["mailstore"], d["alternate"]) for d in json.loads(out)} == expected
    client = make_app(settings, r, admin_token=ADMIN_TOKEN).test_client()
    response = client.get("/admin/api/affected", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert {(d["address"], d["mailstore"], d["alternate"]) for d in json.loads(response.text)} == expected
    # The table (for people at a terminal, not a spreadsheet) shows them as they are too.
    code, out, _ = run(capsys, "affected", "--redis-url", redis_url)
    assert {line.split()[0] for line in out.splitlines()[1:]} == {a for a, _, _ in ROWS}


@pytest.mark.parametrize("value", ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-1", "@SUM(A1)", "\tx", "\rx"])
def test_each_formula_start_is_neutralised(value: str) -> None:
    assert spreadsheet_cell(value) == "'" + value
    out = io.StringIO()
    csv.writer(out).writerow([spreadsheet_cell(value)])
    assert next(csv.reader(io.StringIO(out.getvalue(), newline=""))) == ["'" + value]


@pytest.mark.parametrize("value", ["alice@example.com", "", "0", "42", "store-1", "a=b", " =x", "'=x"])
def test_other_cells_are_left_alone(value: str) -> None:
    assert spreadsheet_cell(value) == value
