"""Reading a local Hugging Face checkpoint directory: ``config.json`` and safetensors weights, as numpy.

No torch at run time: ``safetensors.numpy`` reads the files. Sharded checkpoints
(``model.safetensors.index.json`` naming the shard of each tensor) and single files both work;
bfloat16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays (what JAX uses), cast on request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def unfilled(make: Callable[[], nnx.Module]) -> nnx.Module:
    """``make()`` with abstract parameters, to be filled from a checkpoint, and its other state (dropout streams).

    Nothing is initialised at random: compiling the initialisers would cost seconds per parameter shape
    (and memory for a large model), only for the checkpoint to overwrite them. Fill every parameter
    with :func:`fill`, then call :func:`check_filled`.
    """
    model = nnx.eval_shape(make)
    # Under jit the unused random parameters are dropped before compiling: only the small other state is built.
    nnx.update(model, jax.jit(lambda: nnx.state(make(), nnx.Not(nnx.Param)))())
    return model


def fill(variable: nnx.Variable, value: np.ndarray, name: str) -> None:
    """Set ``variable`` (abstract or not) to checkpoint tensor ``name``, cast to its dtype; shapes must match."""
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(f"tensor {name!r} maps to shape {tuple(value.shape)}, but the model's is "
                         f"{tuple(variable.shape)}.")  # fmt: skip
    variable.set_value(jnp.asarray(value, variable.dtype))  # whole: an abstract variable cannot be indexed


def check_filled(model: nnx.Module) -> nnx.Module:
    """``model``, after checking that no parameter of :func:`unfilled` was left abstract."""
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))
               if isinstance(leaf, jax.ShapeDtypeStruct)]  # fmt: skip
    if missing:
        raise ValueError(f"the checkpoint filled no value for {missing[:5]} ({len(missing)} in all).")
    return model
