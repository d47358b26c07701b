"""Every notebook in ``notebooks/`` runs top to bottom (quick settings) and is stored without outputs.

The kernel is this interpreter (a kernel spec written to a temporary directory and put first on
``JUPYTER_PATH``), so the test works in a fresh virtual environment without registering a kernel.
``THERMO_KFAC_NOTEBOOK_QUICK=1`` tells the notebooks to shrink their sizes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "thermo-kfac-tests"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "thermo-kfac tests", "language": "python"}))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "THERMO_KFAC_NOTEBOOK_QUICK", "MPLBACKEND",
                                            "PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(root), saved["JUPYTER_PATH"]) if p)
    os.environ["THERMO_KFAC_NOTEBOOK_QUICK"] = "1"
    # the quick settings are tiny problems: one thread avoids OpenMP spin-waits on a busy CI host
    # (measured 40 s -> 2 s for notebook 02's error-law cell at load average 16)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend renders the figures
    # the kernel imports this checkout's packages even when they are not installed
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_notebooks_exist() -> None:
    names = [p.name for p in NOTEBOOKS]
    for expected in ("01_quickstart.ipynb", "02_thermodynamic_linear_algebra.ipynb",
                     "03_hardware_projections.ipynb", "04_noise_robustness.ipynb", "05_kfac_variants.ipynb",
                     "06_codesign.ipynb"):
        assert expected in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a code cell has stored outputs (strip them)"
            assert cell.execution_count is None, f"{path.name}: a code cell has an execution count"
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "THERMO_KFAC_NOTEBOOK_QUICK" in code, f"{path.name} must read the quick-mode switch"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, kernel_env: None) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert figures, f"{path.name} produced no inline figure"
