"""The newcomer path: README's code runs as written, no link leaves the repository, the docs' claims hold.

README's ```python blocks run in order in one namespace, as a user would type them into one session. A block
that sets up its own devices (``jax_num_cpu_devices`` or ``--xla_force_host_platform_device_count``) must
run before JAX initialises, so it runs alone in a fresh Python process without the test suite's 8 devices.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEVICE_SETUP = ("jax_num_cpu_devices", "xla_force_host_platform_device_count")


def python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def session_blocks() -> list[str]:
    return [b for b in python_blocks() if not any(s in b for s in DEVICE_SETUP)]


def device_blocks() -> list[str]:
    return [b for b in python_blocks() if any(s in b for s in DEVICE_SETUP)]


def test_readme_has_code_to_run():
    assert len(session_blocks()) >= 2 and len(device_blocks()) >= 1


@pytest.mark.slow  # eager calls compile op by op: ~20 s on two idle cores
def test_readme_session_blocks_run_in_order():
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(session_blocks()):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    # What the blocks say they compute, checked against independent calls.
    import jax.numpy as jnp
    import numpy as np

    aj = namespace["aj"]
    q, k, v, mask = (namespace[name] for name in ("q", "k", "v", "mask"))
    expected = aj.dot_product_attention(q, k, v, mask=mask, implementation="reference")
    np.testing.assert_allclose(namespace["out"], expected, atol=2e-5)
    layer, x = namespace["layer"], namespace["x"]
    assert namespace["y"].shape == x.shape and namespace["y_t"].shape == (x.shape[0], 1, x.shape[2])
    full = layer(jnp.concatenate([x, namespace["x_t"]], axis=1))  # decoding equals the full causal forward
    np.testing.assert_allclose(namespace["y_t"], full[:, -1:], atol=2e-5)
    assert namespace["tokens"].shape == (2, 4)
    assert len(namespace["weights"]) == 2  # one map per layer of the LM


@pytest.mark.slow  # a fresh JAX process: ~10-25 s
@pytest.mark.parametrize("index", range(len(device_blocks())))
def test_readme_device_blocks_run_in_a_fresh_process(index):
    block = device_blocks()[index]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the block must set up its own devices
    env["JAX_PLATFORMS"] = "cpu"
    check = "\nimport jax as _jax\nassert _jax.device_count() == 8, _jax.devices()\n"
    result = subprocess.run([sys.executable, "-c", block + check], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"README device block {index} failed:\n{result.stderr[-3000:]}"


# --- links ----------------------------------------------------------------------------------------

DOCS = [README, *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").glob("*.md"))]


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    names = [n for n in listed.stdout.split("\0") if n]
    suffixes = {".md", ".py", ".ipynb", ".toml", ".cfg", ".txt", ".yml", ".yaml"}
    paths = [ROOT / n for n in names if Path(n).suffix in suffixes or Path(n).name == "Makefile"]
    return [p for p in paths if p.exists()]


URL = re.compile(r"\b(?:https?|ftp)://|\bwww\.", re.I)


def test_no_web_links_anywhere():
    """README, docs, examples, notebooks, code and docstrings name no web address: the repository is its docs."""
    found = []
    for path in tracked_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if URL.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not found, "links that leave the repository:\n" + "\n".join(found)


GENERATED_MARKDOWN = {"gpu_results.md"}  # written by benchmarks/bench_flash_gpu.py, not a document to read


def test_named_documents_exist_in_the_repository():
    """A ``*.md`` named anywhere (docstrings included) is a file of this repository, not a private note."""
    files = tracked_text_files()
    documents = {p.name for p in files if p.suffix == ".md"} | GENERATED_MARKDOWN
    missing = []
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            missing += [f"{path.relative_to(ROOT)}:{n}: {name}" for name in re.findall(r"[\w.-]+\.md\b", line)
                        if Path(name).name not in documents]
    assert not missing, "documents the repository does not hold:\n" + "\n".join(missing)


def _prose(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # fenced blocks hold code, not references


def _inside_repo(target: Path) -> bool:
    try:
        target.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return target.exists()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_paths_resolve_inside_the_repository(path):
    text = _prose(path.read_text())
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):  # markdown links and images
        target = target.split("#")[0]
        if not target:
            continue
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/") or not _inside_repo(
            path.parent / target
        ):
            bad.append(target)
    for ref in re.findall(r"`([^`\s]+)`", text):  # inline paths such as `docs/architecture.md`
        if ref.startswith("../") or ref.startswith("/"):
            bad.append(ref)
        elif "/" in ref and re.search(r"\.(md|py|ipynb|toml)$", ref):
            if not (_inside_repo(ROOT / ref) or _inside_repo(path.parent / ref)):
                bad.append(ref)
    assert not bad, f"{path.relative_to(ROOT)} refers to what the repository does not hold: {bad}"


# --- claims of docs/architecture.md ---------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


def test_kernel_floor_imports_nothing_from_attention_jax():
    for path in sorted((ROOT / "pallas_kernels").rglob("*.py")):
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "attention_jax"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: pallas_kernels is the lower floor"


def test_functional_imports_no_modules():
    for path in sorted((ROOT / "attention_jax" / "functional").rglob("*.py")):
        bad = {m for m in imported_modules(path) if m.startswith(("attention_jax.nn", "flax"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: functional ops have no parameters"
