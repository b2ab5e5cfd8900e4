"""The notebooks are stored stripped and import `lm`; CI executes them (pytest --nbmake)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["attention", "finetune", "quickstart", "sweeps"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_uses_lm(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, path
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, (
            f"{path.name}: outputs in git (python scripts/strip_notebooks.py)")
    source = "\n".join("".join(c["source"]) for c in code)
    assert "from lm" in source or "import lm" in source
    # logic lives in the library: no functions or classes defined in a notebook
    assert "\ndef " not in "\n" + source and "\nclass " not in "\n" + source
