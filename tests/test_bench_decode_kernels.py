"""benchmarks/bench_decode_kernels.py: the child checks that the decode kernel and the dense gather agree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_kernels.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decode_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_child_times_what_agrees():
    bench = _bench()
    res = bench.child({"length": 48, "dtype": "float32", "rounds": 1, "torch": False})
    assert set(res["median"]) == {"ours", "dense gather"}
    assert all(t > 0 for t in res["median"].values())
    # The gather's temporaries hold the whole dense cache; ours only tiles.
    assert res["temp"]["dense gather"] > res["temp"]["ours"] or res["temp"]["ours"] < 2**20
