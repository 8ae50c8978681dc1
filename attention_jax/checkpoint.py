"""Save and restore an NNX model, with its optimizer, through orbax-checkpoint.

A checkpoint directory holds one sub-directory per training step, ``<directory>/<step>/``, with up to three
items: ``model`` (every variable of the model, as a nested dict of arrays), ``optimizer`` (an
``nnx.Optimizer``'s step count and optax state) and ``metadata`` (a JSON dict of your own: config, history).
Orbax writes a step into a temporary directory and renames it once complete, so an interrupted save never
leaves half a checkpoint behind.

Restoring writes into a model (and optimizer) built with the same configuration. The arrays come back with the
target's shardings and dtypes: a model whose parameters are sharded over a mesh restores sharded, whatever
layout (or device count) it was saved from, each device reading only its own shards.

>>> import tempfile
>>> import optax
>>> from flax import nnx
>>> import attention_jax as aj
>>> def make(seed):
...     model = aj.nn.TransformerLM(16, 8, 1, num_heads=2, rngs=nnx.Rngs(seed))
...     return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
>>> model, optimizer = make(0)
>>> directory = tempfile.mkdtemp()
>>> aj.checkpoint.save(directory, model, optimizer, step=100, metadata={"learning_rate": 1e-3})
>>> fresh, fresh_optimizer = make(1)                  # other weights, same configuration
>>> aj.checkpoint.restore(directory, fresh, fresh_optimizer)  # the latest step
100
>>> bool((fresh.embed.embedding[...] == model.embed.embedding[...]).all())
True
>>> aj.checkpoint.read_metadata(directory)
{'learning_rate': 0.001}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["latest_step", "read_metadata", "restore", "save"]

_MODEL, _OPTIMIZER, _METADATA = "model", "optimizer", "metadata"


def save(
    directory: str | os.PathLike,
    model: nnx.Pytree,
    optimizer: nnx.Pytree | None = None,
    *,
    step: int = 0,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_to_keep: int | None = None,
) -> None:
    """Write ``model`` (and ``optimizer``) as step ``step`` of the checkpoint directory ``directory``.

    Args:
      directory: the checkpoint directory (created if missing); the step goes to ``<directory>/<step>/``.
      model: an NNX module (any ``nnx.Pytree``); all its variables are saved, random-key states included.
      optimizer: an ``nnx.Optimizer`` (or any ``nnx.Pytree``) saved alongside, or None.
      step: the step number, a non-negative integer (a training step, an epoch).
      metadata: a JSON-serialisable dict stored with the step (``read_metadata`` returns it).
      overwrite: replace the step if it exists already; otherwise that is a ValueError.
      max_to_keep: keep only this many most recent steps in ``directory`` (None: keep all).

    Every process of a multi-host run calls ``save`` with the same arguments; each writes its own shards.
    """
    _check_node("model", model)
    if optimizer is not None:
        _check_node("optimizer", optimizer)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step=!r}.")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}.")
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
        raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep=!r}.")
    items = {_MODEL: ocp.args.StandardSave(_arrays(model)), _METADATA: ocp.args.JsonSave(metadata or {})}
    if optimizer is not None:
        items[_OPTIMIZER] = ocp.args.StandardSave(_arrays(optimizer))
    with _manager(directory, create=True, max_to_keep=max_to_keep) as manager:
        if step in manager.all_steps():
            if not overwrite:
                raise ValueError(f"step {step} already exists in {directory}; pass overwrite=True to replace it, "
                                 "or another step.")
            manager.delete(step)
        # force: orbax would otherwise skip (silently) a step below the latest one.
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()


def restore(
    directory: str | os.PathLike,
    model: nnx.Pytree,
    optimizer: nnx.Pytree | None = None,
    *,
    step: int | None = None,
) -> int:
    """Load step ``step`` (default: the latest) of ``directory`` into ``model`` (and ``optimizer``), in place.

    ``model`` and ``optimizer`` must be built with the configuration they were saved with: their variables
    give the names, shapes, dtypes and shardings of what is read (a mismatch raises a ValueError naming the
    variable). A checkpoint saved with an optimizer restores a model alone just as well. Returns the step read.
    """
    _check_node("model", model)
    if optimizer is not None:
        _check_node("optimizer", optimizer)
    with _manager(directory, create=False) as manager:
        step = _resolve_step(manager, directory, step)
        saved = manager.item_metadata(step)
        targets = {_MODEL: model} if optimizer is None else {_MODEL: model, _OPTIMIZER: optimizer}
        if _OPTIMIZER in targets and _OPTIMIZER not in saved.keys():
            raise ValueError(f"step {step} of {directory} holds no optimizer state (it was saved without one); "
                             "restore the model alone.")
        items = {}
        for name, node in targets.items():
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(node))  # the target's shardings
            _check_shapes(name, abstract, saved[name], directory, step)
            items[name] = ocp.args.StandardRestore(abstract)
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    for name, node in targets.items():
        state = nnx.state(node)
        nnx.replace_by_pure_dict(state, restored[name])
        nnx.update(node, state)
    return step


def latest_step(directory: str | os.PathLike) -> int | None:
    """The latest step saved in ``directory``; None if the directory holds no checkpoint (or does not exist)."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory, create=False) as manager:
        return manager.latest_step()


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The ``metadata`` dict saved with step ``step`` (default: the latest) of ``directory``."""
    with _manager(directory, create=False) as manager:
        step = _resolve_step(manager, directory, step)
        return manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[_METADATA]


# --- helpers ----------------------------------------------------------------------------------------------


def _manager(directory, *, create: bool, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    path = Path(directory).absolute()  # orbax wants absolute paths
    if not create and not path.is_dir():
        raise ValueError(f"directory {str(directory)!r} does not exist: no checkpoint to read.")
    handlers = {_MODEL: ocp.StandardCheckpointHandler(), _OPTIMIZER: ocp.StandardCheckpointHandler(),
                _METADATA: ocp.JsonCheckpointHandler()}  # fmt: skip
    # Synchronous writes: save returns once the step is on disk (no background thread to wait for).
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path, item_handlers=handlers, options=options)


def _arrays(node) -> dict:
    """The node's variables as a nested dict of arrays: a plain tree, readable without the model's classes."""
    return nnx.to_pure_dict(nnx.state(node))


def _check_node(name: str, node) -> None:
    if not isinstance(node, nnx.Pytree):
        raise TypeError(f"{name} must be an NNX module or optimizer (an nnx.Pytree), got {type(node).__name__}.")


def _resolve_step(manager, directory, step: int | None) -> int:
    steps = manager.all_steps()
    if not steps:
        raise ValueError(f"directory {str(directory)!r} holds no checkpoint.")
    if step is None:
        return manager.latest_step()
    if step not in steps:
        raise ValueError(f"step={step} is not in {str(directory)!r}; it holds steps {sorted(steps)}.")
    return step


def _check_shapes(name: str, abstract, saved, directory, step: int) -> None:
    """Raise a ValueError naming the first variable whose name or shape differs between target and checkpoint."""

    def shapes(tree) -> dict[str, tuple]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {".".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape) for path, x in leaves}

    want, have = shapes(abstract), shapes(saved)
    where = f"step {step} of {str(directory)!r}"
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"the {name} does not match {where}: variables missing from the checkpoint "
                         f"{missing[:5]}, in the checkpoint but not the {name} {extra[:5]}. Build the {name} "
                         "with the configuration it was saved with.")
    for key, shape in want.items():
        if have[key] != shape:
            raise ValueError(f"{name} variable {key} has shape {shape}, but {where} holds {have[key]}. Build the "
                             f"{name} with the configuration it was saved with.")
