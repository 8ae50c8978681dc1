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


def test_generate_drives_a_hybrid_of_every_decoding_module():
    """``aj.generate`` (greedy, prompts of different lengths) over one LM whose layers are every module that
    decodes equals greedy decoding by re-running the full forward."""
    rows = [row for row in pm.ROWS if row.decodes]
    lm = pm.aj.nn.TransformerLM(pm.V, pm.D, len(rows), attention=[row.factory for row in rows], num_heads=2,
                                tie_embeddings=False, rngs=pm.nnx.Rngs(0))  # fmt: skip
    prompt_lengths = pm.jnp.array([3, 6])
    prompt = pm.tokens(6, b=2, t=6)
    new = 4
    out = pm.aj.generate(lm, prompt, max_new_tokens=new, prompt_lengths=prompt_lengths)
    full = pm.nnx.jit(lambda m, t: m(t))
    seq = pm.jnp.zeros((2, pm.T), pm.jnp.int32).at[:, :6].set(prompt)
    rows_ = pm.jnp.arange(2)
    expected = []
    for i in range(new):  # the padded tail is never seen by a causal model at the positions read
        token = full(lm, seq)[rows_, prompt_lengths - 1 + i].argmax(-1)
        seq = seq.at[rows_, prompt_lengths + i].set(token)
        expected.append(token)
    pm.np.testing.assert_array_equal(pm.np.asarray(out), pm.np.stack(expected, axis=1))
