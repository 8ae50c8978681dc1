"""The protocol matrix (second half of the modules): every attention module of ``aj.nn`` x {inside
``TransformerLM``, an optax step that lowers the loss, jit + ``nnx.grad``, decoding with a cache equal
to the full forward, packed ``segment_ids`` equal to the documents run one by one}."""

from __future__ import annotations

import protocol_matrix as pm
import pytest

NAMES = [row.name for row in pm.ROWS[len(pm.ROWS) // 2 :]]


@pytest.mark.parametrize("name", NAMES)
def test_module_in_lm_trains(name):
    pm.check_trains(pm.BY_NAME[name])


@pytest.mark.parametrize("name", NAMES)
def test_module_packed_documents(name):
    pm.check_segments(pm.BY_NAME[name])


@pytest.mark.parametrize("name", NAMES)
def test_module_decodes_like_the_full_forward(name):
    pm.check_decoding(pm.BY_NAME[name])
