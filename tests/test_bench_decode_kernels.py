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
    # Ours holds tiles only: at most a float32 key and value tile of the largest default block (128 slots),
    # whatever the cache length (at 48 tokens that is still more than the whole dense cache).
    tile = bench.B * 128 * bench.K * bench.H * 4
    assert res["temp"]["ours"] <= 2 * tile, res["temp"]
