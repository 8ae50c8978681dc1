"""The selective scan's three forms against a float64 loop of the recurrence, values and gradients.

The oracle is written here from the recurrence (``h_t = exp(dt_t A) h_{t-1} + dt_t x_t b_t^T``,
``y_t = h_t c_t + D x_t``, reset where a packed document starts, frozen on right padding); gradients are
checked as directional derivatives against central differences of the float64 loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.functional.ssm import selective_scan, selective_scan_step, selective_scan_weights

B, T, N, K, H, F = 2, 11, 4, 2, 3, 5
SEGMENTS = np.array([[0] * 11, [3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 7]])  # row 1: a boundary inside a chunk of 4
LENGTHS = np.array([11, 9])
TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(seed: int, per_channel: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(B, T, N, H)),
        dt=np.log1p(np.exp(rng.normal(size=(B, T, N)))),  # softplus: positive steps
        a=-np.exp(rng.normal(size=(N, F) if per_channel else (N,))),
        b=rng.normal(size=(B, T, K, F)),
        c=rng.normal(size=(B, T, K, F)),
        d=rng.normal(size=(N,)),
        state=rng.normal(size=(B, N, H, F)),
    )


def _loop64(x, dt, a, b, c, d, state, segment_ids, lengths):
    """The recurrence in float64, token by token: ``(y [B, T, N, H], final state [B, N, H, F])``."""
    a = a[:, None, :] if a.ndim == 2 else a[:, None, None]  # [N, 1, F|1]
    group = np.arange(N) // (N // K)
    y = np.zeros_like(x)
    h = state.copy()
    for i in range(B):
        for t in range(T):
            if t > 0 and segment_ids[i, t] != segment_ids[i, t - 1]:
                h[i] = 0.0
            step = dt[i, t] if t < lengths[i] else np.zeros(N)
            u = (step[:, None] * x[i, t])[..., None] * b[i, t, group][:, None]  # [N, H, F]
            h[i] = np.exp(step[:, None, None] * a) * h[i] + u
            y[i, t] = np.einsum("NHF,NF->NH", h[i], c[i, t, group]) + d[:, None] * x[i, t]
    return y, h


def _jax_fn(implementation: str, chunk_size: int = 4):
    @jax.jit
    def run(x, dt, a, b, c, d, state):
        return selective_scan(
            x, dt, a, b, c, d, implementation=implementation, chunk_size=chunk_size, segment_ids=jnp.asarray(SEGMENTS),
            lengths=jnp.asarray(LENGTHS), state=state, return_state=True,
        )  # fmt: skip

    return run


FORMS = [("sequential", False), ("associative", False), ("chunked", False), ("sequential", True), ("associative", True)]


@pytest.mark.parametrize("implementation,per_channel", FORMS)
def test_values_and_gradients_match_the_float64_loop(implementation, per_channel):
    inputs = _inputs(0, per_channel)
    run = _jax_fn(implementation)
    args32 = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    y, state = run(**args32)
    assert y.shape == (B, T, N, H) and y.dtype == jnp.float32 and state.shape == (B, N, H, F)
    want_y, want_state = _loop64(**inputs, segment_ids=SEGMENTS, lengths=LENGTHS)
    np.testing.assert_allclose(y, want_y, **TOL)
    np.testing.assert_allclose(state, want_state, **TOL)

    # d/de [sum(w_y * y(p + e v)) + sum(w_s * state(p + e v))] at e = 0, for a random direction v over every input.
    rng = np.random.default_rng(1)
    w_y, w_s = rng.normal(size=want_y.shape), rng.normal(size=want_state.shape)
    direction = {k: rng.normal(size=v.shape) for k, v in inputs.items()}

    def loss32(args):
        y, s = run(**args)
        return jnp.sum(y * w_y) + jnp.sum(s * w_s)

    def loss64(eps):
        y, s = _loop64(**{k: v + eps * direction[k] for k, v in inputs.items()}, segment_ids=SEGMENTS, lengths=LENGTHS)
        return np.sum(y * w_y) + np.sum(s * w_s)

    grads = jax.grad(loss32)(args32)
    along = sum(float(jnp.sum(grads[k] * direction[k])) for k in inputs)
    eps = 1e-6
    want = (loss64(eps) - loss64(-eps)) / (2 * eps)
    np.testing.assert_allclose(along, want, rtol=1e-4)


def test_chunk_size_does_not_change_the_result():
    args = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(2, False).items()}
    ys = [_jax_fn("chunked", size)(**args) for size in (1, 3, 11, 16)]
    for y, state in ys[1:]:
        np.testing.assert_allclose(y, ys[0][0], **TOL)
        np.testing.assert_allclose(state, ys[0][1], **TOL)


def test_packed_row_equals_its_documents_run_alone():
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(3, False).items()}
    row = {k: v[1:] for k, v in inputs.items() if k not in ("a", "d")}
    scan = jax.jit(
        functools.partial(selective_scan, a=inputs["a"], d=inputs["d"], implementation="chunked", chunk_size=4)
    )
    packed = scan(row["x"], row["dt"], b=row["b"], c=row["c"], segment_ids=jnp.asarray(SEGMENTS[1:]))
    first = scan(row["x"][:, :5], row["dt"][:, :5], b=row["b"][:, :5], c=row["c"][:, :5])
    second = scan(row["x"][:, 5:], row["dt"][:, 5:], b=row["b"][:, 5:], c=row["c"][:, 5:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), **TOL)


def test_steps_equal_the_full_scan_and_continue_its_state():
    args = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(4, False).items()}
    full, final = selective_scan(**{k: v for k, v in args.items() if k != "state"}, return_state=True)
    step = jax.jit(selective_scan_step)
    state = jnp.zeros((B, N, H, F))
    for t in range(T):
        x_t, dt_t, b_t, c_t = (args[k][:, t] for k in ("x", "dt", "b", "c"))
        y, state = step(state, x_t, dt_t, args["a"], b_t, c_t, args["d"])
        np.testing.assert_allclose(y, full[:, t], **TOL)
    np.testing.assert_allclose(state, final, **TOL)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_applied_to_x_reproduce_the_scan(per_channel):
    args = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(7, per_channel).items() if k != "state"}
    packing = dict(segment_ids=jnp.asarray(SEGMENTS), lengths=jnp.asarray(LENGTHS))
    y = selective_scan(**args, **packing, implementation="sequential")
    weights = selective_scan_weights(args["dt"], args["a"], args["b"], args["c"], args["d"], **packing)
    assert weights.shape == (B, N, T, T)
    np.testing.assert_allclose(jnp.einsum("BNTS,BSNH->BTNH", weights, args["x"]), y, **TOL)


def test_bfloat16_inputs_give_bfloat16_outputs_and_a_float32_state():
    args = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _inputs(5, False).items() if k != "state"}
    y, state = selective_scan(**args, return_state=True)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    want = selective_scan(**{k: v.astype(jnp.float32) for k, v in args.items()})
    np.testing.assert_allclose(y.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise_naming_the_argument():
    args = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(6, False).items() if k != "state"}
    cases = [
        (dict(dt=args["dt"][:, :, :2]), "dt must be"),
        (dict(b=args["b"][:, :, :, :3]), "c must have the shape of b"),
        (dict(a=jnp.ones((N + 1,))), "a must be"),
        (dict(d=jnp.ones((2,))), "d must be"),
        (dict(b=args["b"][:, :, :1].repeat(3, 2), c=args["c"][:, :, :1].repeat(3, 2)), "must divide"),
        (dict(state=jnp.zeros((B, N, H, F + 1))), "state must be"),
        (dict(implementation="parallel"), "implementation"),
        (dict(a=-jnp.ones((N, F)), implementation="chunked"), "needs one decay per head"),
        (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), "segment_ids"),
        (dict(lengths=jnp.zeros((B + 1,), jnp.int32)), "lengths"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            selective_scan(**{**args, **change})
