"""Frozen dataclasses as pytrees whose tree structure includes their class.

``jax.tree_util.register_dataclass`` (JAX 0.10) builds tree structures that compare equal across
*different* classes with the same number of children: ``tree_structure(KVCache(...)) ==
tree_structure(RollingKVCache(...))`` is True while their hashes differ. ``jax.jit`` keys its cache on the
tree structure, so when two such hashes meet in one bucket, a call with a rolling cache can run the program
traced for a dense cache of the same leaf shapes and return the wrong view: a rare, order-dependent wrong
answer. Registering through ``register_pytree_with_keys`` compares the class, so every pytree dataclass of
the library goes through :func:`register_dataclass` here.
"""

from __future__ import annotations

import dataclasses

import jax


def register_dataclass(cls: type) -> type:
    """Registers a (frozen) dataclass as a pytree; fields with ``metadata=dict(static=True)`` are static.

    Static fields go into the tree structure (they must be hashable), the others are children. The class is
    part of the structure, so two classes never share a compiled program.

    >>> import dataclasses, jax
    >>> @register_dataclass
    ... @dataclasses.dataclass(frozen=True)
    ... class A:
    ...     x: jax.Array
    >>> @register_dataclass
    ... @dataclasses.dataclass(frozen=True)
    ... class B:
    ...     x: jax.Array
    >>> jax.tree_util.tree_structure(A(1)) == jax.tree_util.tree_structure(B(1))
    False
    """
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"register_dataclass expects a dataclass, got {cls!r}.")
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten_with_keys(obj):
        return [(key, getattr(obj, name)) for key, name in zip(keys, data)], tuple(getattr(obj, n) for n in meta)

    def flatten(obj):
        return [getattr(obj, name) for name in data], tuple(getattr(obj, n) for n in meta)

    def unflatten(static, children):
        # Bypass __init__/__post_init__: JAX unflattens with placeholders (None, object()) that validation
        # written for arrays would reject.
        obj = object.__new__(cls)
        for name, value in zip(data, children):
            object.__setattr__(obj, name, value)
        for name, value in zip(meta, static):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
