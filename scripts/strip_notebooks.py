"""Strip outputs and execution counts from notebooks/ (git keeps them clean; CI runs them).

python scripts/strip_notebooks.py [NOTEBOOK ...]   (default: every notebooks/*.ipynb)
"""

from __future__ import annotations

import glob
import os
import sys

import nbformat


def strip(path: str) -> bool:
    """Strips one notebook in place; True when it changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
        if cell.metadata:
            cell.metadata = {}
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
    for path in sys.argv[1:] or sorted(glob.glob(os.path.join(root, "*.ipynb"))):
        print(("stripped " if strip(path) else "clean    ") + path)
