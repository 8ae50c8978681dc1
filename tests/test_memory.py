"""Long-context training stays linear in memory with dropout and score mods (the issue's T = 8192 case).

Compiled, not run: ``compiled.memory_analysis()`` reports the temporaries XLA allocates. A dense
``[B, N, T, S]`` float32 buffer at T = 8192 and N = 8 would be 2 GiB; the blockwise path needs a
few tiles.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import attention_jax as aj

T = 8192
DENSE_BYTES = 8 * T * T * 4  # one [1, N, T, T] float32 buffer


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["dropout", "alibi"])
def test_a_long_training_step_has_no_quadratic_buffer(extra):
    layer = aj.nn.MultiHeadAttention(
        512, num_heads=8, mask=aj.masks.causal(), dropout_rate=0.1 if extra == "dropout" else 0.0,
        alibi=extra == "alibi", rngs=nnx.Rngs(0, dropout=1),
    )  # fmt: skip
    optimizer = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x, deterministic=False) ** 2))(layer)
        optimizer.update(layer, grads)
        return loss

    x = jax.ShapeDtypeStruct((1, T, 512), jnp.float32)
    compiled = step.lower(layer, optimizer, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < DENSE_BYTES / 8, (
        f"{temp / 2**20:.0f} MiB of temporaries (a dense score buffer is {DENSE_BYTES >> 20} MiB)"
    )
