"""docs/reproduce.md: every preset it names builds, and every published table has a row."""
import os
import re

import pytest

from tests.test_configs import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reproduce.md")
# Another preset in progress: named in the doc, whose row says so until the file exists.
IN_PROGRESS = {"configs/lightningdit.py": "preset being added"}


def _doc():
    with open(DOC) as f:
        return f.read()


def _presets(text):
    """`configs/<file>.py[:arg]` named in the doc; `:S` (B, L...) forms count each scale."""
    found = set()
    for path, arg in re.findall(r"(configs/[a-z_]+\.py)(?::([A-Za-z0-9_=,]+))?", text):
        found.add((path, arg or None))
    for arg in re.findall(r"`:([A-Za-z0-9_=,]+)`", text):  # "`:B,table8`" after a full name
        found.add(("configs/dico.py", arg))
    return sorted(found, key=str)


def test_every_preset_in_reproduce_md_builds():
    text = _doc()
    presets = _presets(text)
    assert ("configs/dico.py", "XL,long") in presets and ("configs/dico.py", "S,res=1024") in presets
    built = 0
    for path, arg in presets:
        if not os.path.exists(os.path.join(ROOT, path)):
            assert path in IN_PROGRESS, f"docs/reproduce.md names {path}, which does not exist"
            row = next(line for line in text.splitlines() if path in line and line.startswith("|"))
            assert IN_PROGRESS[path] in row
            continue
        config = parse(f"--config={os.path.join(ROOT, path)}" + (f":{arg}" if arg else ""))
        assert config.model.name.startswith("DiCo-"), (path, arg)
        built += 1
    assert built >= 12


@pytest.mark.parametrize("table", ["Table 2", "Table 6", "Table 7", "Table 8", "Tables 9/10",
                                   "Table 11", "Table 12", "Table 13", "Official README"])
def test_every_published_table_has_a_row_with_a_status(table):
    rows = [line for line in _doc().splitlines() if line.startswith(f"| {table}")]
    assert rows, table
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5 and all(cells), row
        assert re.search(r"reproduced on CPU|needs a TPU|needs released weights|not reproducible"
                         r"|settings reproduced", cells[4]), row
