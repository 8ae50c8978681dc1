"""Reading a local Hugging Face checkpoint directory: ``config.json`` and safetensors weights, as numpy.

No torch at run time: ``safetensors.numpy`` reads the files. Sharded checkpoints
(``model.safetensors.index.json`` naming the shard of each tensor) and single files both work;
bfloat16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays (what JAX uses), cast on request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of checkpoint directory ``path`` as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"path must be a Hugging Face checkpoint directory with a config.json, got path={path!s}.")
    return json.loads(file.read_text())


def read_weights(path: str | Path, dtype: Any = None) -> dict[str, np.ndarray]:
    """Every tensor of checkpoint directory ``path`` by its Hugging Face name (sharded or single file).

    ``dtype``: cast floating tensors to it (e.g. ``np.float32``); None keeps the stored dtypes.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if (path / INDEX).is_file():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    elif (path / SINGLE).is_file():
        shards = [SINGLE]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            raise ValueError(f"no safetensors weights in {path!s} (expected {SINGLE} or {INDEX}).")
        shards = found
    weights: dict[str, np.ndarray] = {}
    for shard in shards:
        weights.update(load_file(str(path / shard)))
    if dtype is not None:
        weights = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v
                   for k, v in weights.items()}  # fmt: skip
    return weights


def take(weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """``weights[name]`` with an error naming the missing tensor and the checkpoint's closest names."""
    if name not in weights:
        prefix = name.rsplit(".", 1)[0]
        near = sorted(k for k in weights if k.startswith(prefix))[:5]
        raise ValueError(f"the checkpoint has no tensor {name!r} (tensors under {prefix!r}: {near}).")
    return weights[name]


def write_weights(path: str | Path, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (the reverse export)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(config), indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path / SINGLE))
