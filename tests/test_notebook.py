"""notebooks/quickstart.ipynb runs top to bottom on 8 fake CPU devices, with fewer steps."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def tagged(notebook, tag):
    return next(cell for cell in notebook.cells if tag in cell.metadata.get("tags", []))


def test_the_quickstart_notebook_runs_and_trains(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged(notebook, "parameters").source = (f"STEPS = 200\n"
                                             f"WORKDIR = {str(tmp_path / 'digits')!r}\n")
    # The kernel inherits this process's environment: 8 fake CPU devices (conftest.py).
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    output = "".join(o.get("text", "") for o in tagged(notebook, "result").outputs)
    digits = float(re.search(r"digits_cnn test accuracy: ([0-9.]+)", output).group(1))
    own = float(re.search(r"own experiment test accuracy: ([0-9.]+)", output).group(1))
    assert digits >= 0.9 and own >= 0.9, output
    devices = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.outputs if "device(s)" in o.get("text", ""))
    assert devices.startswith("8 device(s)")
    resumed = "".join(o.get("text", "") for cell in notebook.cells
                      if "again = jaxdist.fit" in cell.source for o in cell.outputs)
    assert "already_complete at step 200" in resumed
    assert (tmp_path / "digits" / "metrics.jsonl").exists()
