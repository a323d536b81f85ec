"""Every notebook in colabs/ runs top to bottom from its own folder (Jupyter's default working directory)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "colabs").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[1].cell_type == "code" and "pip" in nb.cells[1].source  # the install cell opens it
    saved = [c for c in nb.cells if c.cell_type == "code" and c.get("outputs")]
    assert len(saved) >= len([c for c in nb.cells if c.cell_type == "code"]) - 1  # outputs kept for the reader
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
