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


BUILDER = load_builder()
BUILT = BUILDER.notebooks()


def test_committed_notebooks_are_the_built_ones_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(BUILT)
    for name, built in BUILT.items():
        on_disk = json.loads((NOTEBOOKS / name).read_text())
        assert on_disk == json.loads(nbformat.writes(built)), f"{name} differs from notebooks/build.py: rebuild it"
        for cell in on_disk["cells"]:
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name} has outputs"
        first_code = next(c for c in on_disk["cells"] if c["cell_type"] == "code")
        assert "".join(first_code["source"]) == BUILDER.INSTALL  # the one install cell, the same everywhere
        assert sum("pip install" in "".join(c["source"]) for c in on_disk["cells"]) == 1


def run_install_cell(monkeypatch, importable: bool, source: str | None) -> list[str]:
    """Execute the install cell as IPython would; return the pip commands it issued (variables expanded)."""
    transform = pytest.importorskip("IPython.core.inputtransformer2").TransformerManager().transform_cell
    issued = []

    class Shell:
        def run_line_magic(self, magic, line):
            issued.append(f"%{magic} {line.format(**namespace)}")  # IPython expands {name} from the caller

    if source is None:
        monkeypatch.delenv(BUILDER.SOURCE_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(BUILDER.SOURCE_VARIABLE, source)
    if not importable:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "attention_jax" else
                            find_spec(name, *a))
    namespace = {"get_ipython": Shell}
    exec(transform(BUILDER.INSTALL), namespace)
    return issued


def test_install_cell_installs_from_one_configurable_source(monkeypatch):
    assert "OWNER" not in BUILDER.INSTALL and "://" not in BUILDER.INSTALL
    assert BUILDER.DEFAULT_SOURCE == "attention_jax"  # the package as published, not a placeholder
    assert run_install_cell(monkeypatch, importable=True, source=None) == []  # importable: nothing to install
    assert run_install_cell(monkeypatch, importable=False, source=None) == ['%pip install --quiet "attention_jax"']
    assert run_install_cell(monkeypatch, importable=False, source="/content/attention_jax") == [
        '%pip install --quiet "/content/attention_jax"'
    ]


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
