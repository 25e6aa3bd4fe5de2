"""notebooks/quickstart.ipynb runs top to bottom on 8 fake CPU devices, with fewer steps."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def tagged(notebook, tag):
    return next(cell for cell in notebook.cells if tag in cell.metadata.get("tags", []))


def fresh_kernel(folder):
    """A kernel in a new virtual environment that has no jaxdist (nor jax): only ipykernel.

    Returns the kernel's name and the environment's python; JUPYTER_PATH must name
    `folder / "jupyter"` for the kernel to be found.
    """
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "ipykernel"], check=True,
                   timeout=300, capture_output=True)
    spec = folder / "jupyter" / "kernels" / "fresh"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh environment", "language": "python"}))
    return "fresh", python


def test_the_quickstart_notebook_installs_jaxdist_and_trains_as_a_user_runs_it(
        tmp_path, monkeypatch):
    # As Jupyter runs it: the kernel in notebooks/, in an environment without jaxdist or
    # jax, the source named by the JAXDIST_SOURCE environment variable.
    kernel, python = fresh_kernel(tmp_path)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAXDIST_SOURCE", str(ROOT))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged(notebook, "parameters").source = (f"STEPS = 200\n"
                                             f"WORKDIR = {str(tmp_path / 'digits')!r}\n")
    # The kernel inherits this process's environment: 8 fake CPU devices (conftest.py).
    NotebookClient(notebook, timeout=600, kernel_name=kernel,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    installed = subprocess.run([str(python), "-c", "import jaxdist; print(jaxdist.__file__)"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert str(tmp_path / "venv") in installed.stdout  # the notebook installed it there
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


def test_the_notebook_finds_the_clone_it_sits_in():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = tagged(notebook, "install").source.split("if importlib.util.find_spec")[0]
    space = {}
    exec(compile(code, "install cell", "exec"), space)  # the definitions, not the install
    here = Path.cwd()
    try:
        os.chdir(NOTEBOOK.parent)
        assert space["clone_folder"]() == str(ROOT)
    finally:
        os.chdir(here)
