"""The lessons in notebooks/: committed without outputs, and each runs top to bottom in a Jupyter kernel in
its small setting (TF_BY_HAND_QUICK=1, documented in its first cell: 20,000 training and 2,000 test images, a
few dozen steps, no XLA), ending with its assert on the test accuracy. The lessons share one kernel, so that
TensorFlow is imported once, not seven times; each starts from an empty namespace (`%reset -f`)."""
import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_seven_lessons_are_there():
    assert [path.stem[:2] for path in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_the_small_setting_is_documented_and_its_floor_far_above_chance(path):
    """The first code cell explains TF_BY_HAND_QUICK and cuts the data; every floor asserted in the small setting
    is at least 0.7 (chance is 0.1), below the full run's."""
    code = ["".join(cell["source"]) for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]
    assert "# TF_BY_HAND_QUICK=1 is the small setting" in code[0] and "data = data.subset(" in code[0]
    floors = [(float(quick), float(full)) for quick, full in
              re.findall(r">= \((0\.\d+) if QUICK else (0\.\d+)\)", "\n".join(code))]
    assert floors and all(0.7 <= quick < full for quick, full in floors), floors


@pytest.fixture(scope="module")
def kernel(mnist_dir):
    """A Python kernel started in notebooks/ in the small setting, for all the lessons of this module."""
    pytest.importorskip("nbclient")
    from jupyter_client import AsyncKernelManager
    from jupyter_core.utils import run_sync

    manager = AsyncKernelManager(kernel_name="python3")
    env = dict(os.environ, TF_BY_HAND_QUICK="1", TF_BY_HAND_DATA_DIR=mnist_dir, TF_CPP_MIN_LOG_LEVEL="2")
    run_sync(manager.start_kernel)(cwd=str(REPO / "notebooks"), env=env)
    yield manager
    run_sync(manager.shutdown_kernel)(now=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_runs_top_to_bottom(path, kernel):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))   # nothing left by the lesson before
    client = nbclient.NotebookClient(notebook, km=kernel, timeout=240)
    try:
        client.execute()
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert not [output.text for output in outputs if output.get("name") == "stderr"]   # no red box: notices hidden
    assert any("image/png" in output.get("data", {}) for output in outputs), "no picture was shown"
