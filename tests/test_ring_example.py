"""The long-context ring example runs (``--small``) and agrees with the reference on its slice."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "long_context_ring.py"


def test_long_context_ring_example_small(capsys):
    spec = importlib.util.spec_from_file_location("long_context_ring", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # jax already has the 8 test devices: the example keeps them
    example.main(["--small", "--docs", "2"])
    printed = capsys.readouterr().out
    assert "document 2/2" in printed
    error = float(printed.rsplit("max |ring - reference| on the last 256 queries:", 1)[1].split()[0])
    assert error < 1e-4
