"""implementation="cudnn": mask translation (everywhere) and numerics (on a CUDA GPU only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, random_qkv

import attention_jax as aj
from attention_jax import masks
from attention_jax.functional.backends import cudnn

ON_GPU = jax.default_backend() == "gpu"


def test_masks_answer_the_jax_nn_arguments_cudnn_takes():
    lengths = jnp.array([3, 4])
    assert masks.causal().jax_nn_arguments() == {"is_causal": True}
    assert (masks.causal() & masks.sliding_window(8)).jax_nn_arguments() == {
        "is_causal": True,
        "local_window_size": (8, 0),
    }
    got = masks.padding(kv_lengths=lengths).jax_nn_arguments()
    assert set(got) == {"key_value_seq_lengths"} and got["key_value_seq_lengths"] is lengths
    assert cudnn._mask_arguments(masks.causal()) == {"is_causal": True}


@pytest.mark.parametrize(
    "mask",
    [
        masks.chunked(4),
        masks.causal(offset=2),
        masks.causal() | masks.global_tokens([0]),
        masks.sliding_window(2) & masks.sliding_window(3),
    ],
)
def test_refuses_masks_it_cannot_serve(mask):
    with pytest.raises(ValueError, match="jax.nn"):
        mask.jax_nn_arguments()
    with pytest.raises(NotImplementedError, match="cuDNN serves"):
        cudnn._mask_arguments(mask)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU error")
def test_needs_a_gpu():
    q, k, v = random_qkv(0, b=1, t=8, n=2, h=8)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        aj.dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mask", [None, masks.causal(), masks.causal() & masks.sliding_window(16)])
def test_matches_reference_on_gpu(mask):
    q, k, v = random_qkv(1, b=2, t=128, n=4, k=2, h=64, dtype=jnp.bfloat16)
    out = aj.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    assert_close(out, aj.dot_product_attention(q, k, v, mask=mask, implementation="reference"), dtype=jnp.bfloat16)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
