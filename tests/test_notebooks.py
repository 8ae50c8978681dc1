"""The notebooks: generated from notebooks/build.py without outputs, and executed top to bottom (small settings)."""

import importlib.util
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def load_builder():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILT = load_builder().notebooks()


def test_committed_notebooks_are_the_built_ones_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(BUILT)
    for name, built in BUILT.items():
        on_disk = json.loads((NOTEBOOKS / name).read_text())
        assert on_disk == json.loads(nbformat.writes(built)), f"{name} differs from notebooks/build.py: rebuild it"
        for cell in on_disk["cells"]:
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name} has outputs"
        first_code = next(c for c in on_disk["cells"] if c["cell_type"] == "code")
        assert "pip install" in "".join(first_code["source"])  # the one install cell, guarded by the import


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(BUILT))
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_JAX_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
