"""The Pallas SSD scan (``pallas_kernels.ssd_scan``, ``selective_scan(implementation="pallas")``) against
float64 and the XLA forms: values and gradients of every input, both kernel bodies in their interpreters;
then the lowering of its forward and backward kernels for CUDA (Triton) and TPU (Mosaic), the refusals, and
``benchmarks/bench_ssm.py --quick``.

The float64 oracle is the recurrence token by token, written here (reset where a packed document starts,
frozen on right padding, continuing an initial state). Gradients: each input's full gradient against
autodiff of the sequential XLA form in float32, and a directional derivative against central differences
of the float64 loop.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.functional.ssm import selective_scan
from pallas_kernels.ssd_scan import ssd_scan, ssd_scan_reference

# T = 40 in chunks of 16: a ragged last chunk. Row 1 packs three documents: a boundary inside a chunk (5)
# and one on a chunk boundary (32); its last 6 tokens are right padding.
B, T, N, K, H, F, CHUNK = 2, 40, 4, 2, 8, 20, 16  # F = 20: padded to 32 on GPU, two carry programs
SEGMENTS = np.array([[0] * T, [3] * 5 + [7] * 27 + [2] * 8])
LENGTHS = np.array([T, T - 6])
TOL = {jnp.float32: dict(rtol=2e-4, atol=2e-4), jnp.bfloat16: dict(rtol=5e-2, atol=5e-2)}
NAMES = ("x", "dt", "a", "b", "c", "d", "state")


def _inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(B, T, N, H)),
        dt=np.log1p(np.exp(rng.normal(size=(B, T, N)) - 1.0)),  # softplus: positive steps
        a=-np.exp(rng.normal(size=(N,))),
        b=rng.normal(size=(B, T, K, F)),
        c=rng.normal(size=(B, T, K, F)),
        d=rng.normal(size=(N,)),
        state=rng.normal(size=(B, N, H, F)),
    )


def _loop64(x, dt, a, b, c, d, state):
    """The recurrence in float64, token by token: ``(y [B, T, N, H], final state [B, N, H, F])``."""
    group = np.arange(N) // (N // K)
    y, h = np.zeros_like(x), state.copy()
    for i in range(B):
        for t in range(T):
            if t > 0 and SEGMENTS[i, t] != SEGMENTS[i, t - 1]:
                h[i] = 0.0
            step = dt[i, t] if t < LENGTHS[i] else np.zeros(N)
            u = (step[:, None] * x[i, t])[..., None] * b[i, t, group][:, None]  # [N, H, F]
            h[i] = np.exp(step * a)[:, None, None] * h[i] + u
            y[i, t] = np.einsum("NHF,NF->NH", h[i], c[i, t, group]) + d[:, None] * x[i, t]
    return y, h


def _scan(implementation: str, backend: str | None = None, schedule: str | None = None):
    def run(x, dt, a, b, c, d, state):
        if implementation != "pallas" or backend is None:
            return selective_scan(
                x, dt, a, b, c, d, implementation=implementation, chunk_size=CHUNK, segment_ids=jnp.asarray(SEGMENTS),
                lengths=jnp.asarray(LENGTHS), state=state, return_state=True,
            )  # fmt: skip
        # The kernel directly (a chosen body and schedule): runs and right padding as ssd_scan takes them.
        valid = jnp.arange(T) < jnp.asarray(LENGTHS)[:, None]
        runs = jnp.cumsum(jnp.asarray(np.diff(SEGMENTS, axis=1, prepend=SEGMENTS[:, :1]) != 0, jnp.int32), axis=1)
        y, h = ssd_scan(x, jnp.where(valid[..., None], dt, 0.0), a, b, c, runs=runs, state=state, chunk_size=CHUNK,
                        backend=backend, interpret=True, schedule=schedule)  # fmt: skip
        return (y.astype(jnp.float32) + d[:, None] * x).astype(x.dtype), h

    return run


def _weights(seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T, N, H)), rng.normal(size=(B, N, H, F))


# None: through selective_scan (on CPU the Triton body; B x N = 8 programs picks its "chunks" schedule).
@pytest.mark.parametrize("backend,schedule", [(None, None), ("gpu", "fused"), ("tpu", "fused")])
def test_values_and_gradients_match_float64_and_the_xla_form(backend, schedule):
    inputs = _inputs(0)
    args = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    w_y, w_s = _weights(1)
    kernel, xla = _scan("pallas", backend, schedule), _scan("sequential")

    def loss(run, args):
        y, s = run(**args)
        return jnp.sum(y * w_y) + jnp.sum(s * w_s)

    @jax.jit
    def program(args):
        return kernel(**args), jax.grad(lambda p: loss(kernel, p))(args), jax.grad(lambda p: loss(xla, p))(args)

    (y, state), grads, want_grads = jax.tree.map(np.asarray, program(args))
    assert y.shape == (B, T, N, H) and y.dtype == np.float32
    assert state.shape == (B, N, H, F) and state.dtype == np.float32
    want_y, want_state = _loop64(**inputs)
    np.testing.assert_allclose(y, want_y, **TOL[jnp.float32])
    np.testing.assert_allclose(state, want_state, **TOL[jnp.float32])
    for name in NAMES:
        scale = np.abs(want_grads[name]).max()
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)

    # Central differences of the float64 loop along a random direction through every input.
    rng = np.random.default_rng(2)
    direction = {k: rng.normal(size=v.shape) for k, v in inputs.items()}

    def loss64(eps):
        y, s = _loop64(**{k: v + eps * direction[k] for k, v in inputs.items()})
        return np.sum(y * w_y) + np.sum(s * w_s)

    along = sum(float(np.sum(grads[k] * direction[k])) for k in NAMES)
    np.testing.assert_allclose(along, (loss64(1e-6) - loss64(-1e-6)) / 2e-6, rtol=2e-4)


def test_bfloat16_matmuls_stay_close_and_give_a_float32_state():
    """bf16 ``x, b, c`` (the kernels' matmul operands): values and gradients within bf16 rounding of float32."""
    args = {k: jnp.asarray(v, jnp.bfloat16 if k in "xbc" else jnp.float32) for k, v in _inputs(3).items()}
    w_y, w_s = _weights(4)
    kernel, xla = _scan("pallas"), _scan("sequential")

    def loss(run, args):
        y, s = run(**args)
        return jnp.sum(y.astype(jnp.float32) * w_y) + jnp.sum(s * w_s)

    @jax.jit
    def program(args):
        wide = jax.tree.map(lambda v: v.astype(jnp.float32), args)  # the same (bf16-rounded) values in float32
        return kernel(**args), jax.grad(lambda p: loss(kernel, p))(args), jax.grad(lambda p: loss(xla, p))(wide)

    (y, state), grads, want_grads = program(args)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert all(grads[k].dtype == args[k].dtype for k in NAMES)
    want_y, want_state = _loop64(**{k: np.asarray(v, np.float64) for k, v in args.items()})
    np.testing.assert_allclose(np.asarray(y, np.float32), want_y, rtol=0.05, atol=0.02 * np.abs(want_y).max())
    np.testing.assert_allclose(state, want_state, rtol=0.05, atol=0.02 * np.abs(want_state).max())
    for name in NAMES:
        got, want = np.asarray(grads[name], np.float32), np.asarray(want_grads[name])
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.03 * np.abs(want).max(), err_msg=name)


def test_the_reference_is_the_recurrence():
    inputs = _inputs(4)
    args = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    y, state = jax.jit(_scan("sequential"))(**args)
    # ssd_scan_reference on one document without padding, against the float64 loop of the same call.
    one = dict(x=args["x"][:1], dt=args["dt"][:1], b=args["b"][:1], c=args["c"][:1], state=args["state"][:1])
    ref_y, ref_state = jax.jit(ssd_scan_reference)(one["x"], one["dt"], args["a"], one["b"], one["c"],
                                                   state=one["state"])  # fmt: skip
    np.testing.assert_allclose(ref_y + args["d"][:, None] * one["x"], y[:1], **TOL[jnp.float32])
    np.testing.assert_allclose(ref_state, state[:1], **TOL[jnp.float32])


def test_refusals_name_the_argument():
    args = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(5).items()}
    per_channel = jnp.ones((N, F))
    with pytest.raises(ValueError, match=r"implementation='pallas' .* a \[N\]"):
        selective_scan(args["x"], args["dt"], per_channel, args["b"], args["c"], implementation="pallas")
    with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16"):
        selective_scan(args["x"], args["dt"], args["a"], args["b"], args["c"], implementation="pallas", chunk_size=8)
    with pytest.raises(ValueError, match=r"a must be \[N\]"):
        ssd_scan(args["x"], args["dt"], per_channel, args["b"], args["c"])
    with pytest.raises(ValueError, match=r"runs must be integers"):
        ssd_scan(args["x"], args["dt"], args["a"], args["b"], args["c"], runs=jnp.zeros((B, T)))
    with pytest.raises(ValueError, match="schedule='chunks' has no TPU body"):
        ssd_scan(args["x"], args["dt"], args["a"], args["b"], args["c"], backend="tpu", schedule="chunks")


# -- lowering for the accelerators -----------------------------------------------------------------

CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
LAUNCHES = {"fused": (1, 2), "chunks": (3, 6)}  # kernels in the forward, and in forward + backward


@pytest.mark.parametrize("platform,schedule", [("cuda", "fused"), ("cuda", "chunks"), ("tpu", "fused")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower(platform, schedule, dtype):
    """Mamba-2's shapes (H = 64, F = 128, chunks of 64, G = 4 heads per group); T = 300 is 5 chunks (not a
    power of two), the last one ragged."""
    backend = "tpu" if platform == "tpu" else "gpu"
    b_, t, n, k, h, f = 2, 300, 8, 2, 64, 128
    args = (
        jax.ShapeDtypeStruct((b_, t, n, h), dtype),
        jax.ShapeDtypeStruct((b_, t, n), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((b_, t, k, f), dtype),
        jax.ShapeDtypeStruct((b_, t, k, f), dtype),
        jax.ShapeDtypeStruct((b_, t), jnp.int32),
        jax.ShapeDtypeStruct((b_, n, h, f), jnp.float32),
    )

    def scan(x, dt, a, b, c, runs, state):
        y, s = ssd_scan(x, dt, a, b, c, runs=runs, state=state, chunk_size=64, backend=backend, interpret=False,
                        schedule=schedule)  # fmt: skip
        return y.astype(jnp.float32).sum() + s.sum()

    lower = lambda f: jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()  # noqa: E731
    forward, backward = LAUNCHES[schedule]
    assert lower(scan).count(CALL[platform]) == forward
    assert lower(jax.grad(scan, argnums=(0, 1, 2, 3, 4, 6))).count(CALL[platform]) == backward


# -- the benchmark ---------------------------------------------------------------------------------

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ssm.py"


def test_bench_quick_runs(capsys):
    """``--quick`` on the chunked forms, in this process: the XLA form is timed, the kernel marked GPU/TPU-only."""
    spec = importlib.util.spec_from_file_location("bench_ssm", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--forms", "chunked,pallas", "--no-layer", "--in-process", "--lengths", "256"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 1, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3:5] == [bench.ACCELERATOR_ONLY] * 2, row  # on this CPU the kernel is not timed
        assert float(cells[1]) > 0 and float(cells[7]) > 0, row  # chunked fwd ms, chunked GFLOP/s


def test_mamba2_layer_runs_the_kernel_as_its_chunked_form():
    from flax import nnx

    from attention_jax.nn import Mamba, Mamba2

    layers = {impl: Mamba2(16, head_dim=8, state_dim=4, chunk_size=16, implementation=impl, rngs=nnx.Rngs(0))
              for impl in ("pallas", "chunked")}  # fmt: skip
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 21, 16)), jnp.float32)
    ys = nnx.jit(lambda layers, x: {k: layer(x) for k, layer in layers.items()})(layers, x)
    np.testing.assert_allclose(ys["pallas"], ys["chunked"], **TOL[jnp.float32])
    with pytest.raises(ValueError, match="implementation='pallas'"):
        Mamba(16, implementation="pallas", rngs=nnx.Rngs(0))
