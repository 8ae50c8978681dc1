"""benchmarks/bench_decode.py --quick: ours and transformers agree, and the RESULTS.md section is written.

The benchmark asserts parity itself before timing (prefill logits and greedy tokens of ours, ``aj.generate``
and transformers' DynamicCache and StaticCache loops), so a model or cache that drifts from transformers
fails here. The section goes to a file in ``tmp_path`` that already holds another section, which must survive.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_writes_its_section(tmp_path):
    bench = _bench()
    results = tmp_path / "RESULTS.md"
    other = "<!-- begin: Other -->\n## Other\n\nkeep me\n<!-- end: Other -->"
    results.write_text(f"# Benchmark results\n\n{other}\n")
    bench.main(["--quick", "--results", str(results)])
    text = results.read_text()
    assert other in text
    section = text.split(f"<!-- begin: {bench.SECTION} -->", 1)[1].split(f"<!-- end: {bench.SECTION} -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 4, section  # (prefill, decode) x (B=1, B=2)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "n/a" not in cells, row  # every implementation ran
        assert sum(c.endswith("x") for c in cells) == 2, row  # ours / dynamic, ours / static
    for row in rows[2:]:  # the decode table
        assert row.count("100%") == 2, row  # the timed greedy tokens equal ours, both caches


def test_bad_arguments():
    with pytest.raises(ValueError, match="--lengths must exceed --steps"):
        _bench().main(["--quick", "--lengths", "4", "--steps", "4"])
