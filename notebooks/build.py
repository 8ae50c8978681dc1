"""Write the notebooks of this folder from the cells below (no outputs are ever committed).

    python notebooks/build.py          # rewrites notebooks/*.ipynb

Edit the cells here, not the .ipynb files. Every notebook starts with the same install cell: it does nothing
where ``import attention_jax`` works (this repository's venv), and elsewhere (Colab: File > Upload notebook)
runs ``pip install`` on ``ATTENTION_JAX_SOURCE``: the package name on the index by default, or whatever the
environment variable of that name says (a local checkout, a wheel, any pip requirement). Each notebook reads
``ATTENTION_JAX_SMALL=1`` to shrink its work; ``tests/test_notebooks.py`` executes them that way.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
# Where the install cell gets attention_jax from when it is not importable: a pip requirement. The default is the
# package as published on the index; set the environment variable ATTENTION_JAX_SOURCE before the cell runs to
# install from elsewhere (e.g. "/content/attention_jax" for a checkout uploaded to Colab, or a wheel file).
SOURCE_VARIABLE = "ATTENTION_JAX_SOURCE"
DEFAULT_SOURCE = "attention_jax"

INSTALL = f"""\
# Install attention_jax where it is missing (Colab, a fresh environment); nothing happens where it is importable.
# find_spec looks without importing, so JAX is not initialised yet and a later cell may still configure devices.
import importlib.util
import os

{SOURCE_VARIABLE} = os.environ.get("{SOURCE_VARIABLE}", "{DEFAULT_SOURCE}")  # a pip requirement: name, path or wheel
if importlib.util.find_spec("attention_jax") is None:
    %pip install --quiet "{{{SOURCE_VARIABLE}}}"
"""

OPENING = f"""\
Runs top to bottom on a CPU. To open it in Colab, upload it (File > Upload notebook); the first cell installs
`attention_jax` there (from `{SOURCE_VARIABLE}`, by default the published package) and does nothing where the
package is already importable."""

SMALL = """\
import os

SMALL = os.environ.get("ATTENTION_JAX_SMALL") == "1"  # the test suite runs the notebooks with small settings
"""


def notebook(title: str, cells: list):
    head = [new_markdown_cell(f"# {title}\n\n{OPENING}"), new_code_cell(INSTALL)]
    nb = new_notebook(cells=head + cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
        "accelerator": "NONE",
    }
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # stable ids: rebuilding gives the same file
    nbformat.validate(nb)
    return nb


md, code = new_markdown_cell, new_code_cell

# --- 1. a tour of the variants -----------------------------------------------------------------------

TOUR = [
    md("""\
Every attention variant of `attention_jax` is a pure function over `[B, T, N, H]` arrays and a Flax NNX module
that owns the projections and calls it. This notebook walks through them: the core op and its masks, grouped
and latent attention, differential attention, the linear, low-rank and sparse families, and the recurrent-era
scores. Everything runs on a CPU in a few minutes."""),
    code(SMALL + """\
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import attention_jax as aj

print(jax.__version__, jax.devices())"""),
    md("""\
## The core op and its masks

`aj.dot_product_attention(q, k, v, mask=...)` takes queries `[B, T, N, H]` and keys/values `[B, S, K, H]`.
A mask is a lazy object (`True` = may attend) that combines with `&`, `|` and `~`; the fast paths read its
*block map* and skip the tiles it rules out."""),
    code("""\
T = 24
masks = {
    "causal": aj.masks.causal(),
    "causal & window(6)": aj.masks.causal() & aj.masks.sliding_window(6),
    "chunked(8)": aj.masks.chunked(8),
    "prefix_lm(8)": aj.masks.prefix_lm(8),
    "window(3, 3) | global([0])": aj.masks.sliding_window(3, 3) | aj.masks.global_tokens([0]),
    "dilated(8, 2)": aj.masks.dilated(8, 2),
    "random_blocks(4, 2)": aj.masks.random_blocks(4, 2),
    "segments": aj.masks.segments(jnp.array([[0] * 10 + [1] * 14])),
}
fig, axes = plt.subplots(2, 4, figsize=(12, 6.5))
for ax, (name, mask) in zip(axes.flat, masks.items()):
    dense = np.asarray(mask.dense(T, T)).reshape(-1, T, T)[0]
    ax.imshow(dense, cmap="Blues")
    ax.set_title(name, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
fig.suptitle("rows: queries, columns: keys")
plt.show()"""),
    code("""\
q = jax.random.normal(jax.random.key(0), (2, 256, 8, 32))   # [B, T, N, H]
kv = jax.random.normal(jax.random.key(1), (2, 256, 2, 32))  # [B, S, K, H]: GQA, 4 query heads per K/V head
mask = aj.masks.causal() & aj.masks.sliding_window(64)
out = aj.dot_product_attention(q, kv, kv, mask=mask)
print(out.shape, "| block map (0 skip, 1 partial, 2 full):")
print(mask.block_map(256, 256, 64, 64))"""),
    md("""\
## Attention modules

Each module takes keyword-only configuration and `rngs`. `MultiHeadAttention` covers MHA, GQA (`num_kv_heads`)
and MQA (`num_kv_heads=1`), RoPE, ALiBi, softcapping, sinks and sliding windows; `MultiHeadLatentAttention`
(DeepSeek-V2) caches a small latent instead of keys and values; `DifferentialAttention` subtracts two softmax
maps. All of them decode with a KV cache. `nnx.jit` compiles a call once per input shape (called eagerly, JAX
dispatches op by op, which is slow on small inputs)."""),
    code("""\
D = 64
x = jax.random.normal(jax.random.key(2), (2, 32, D))  # [B, T, D]
causal = aj.masks.causal()
layers = {
    "MHA": aj.nn.MultiHeadAttention(D, num_heads=8, mask=causal, rngs=nnx.Rngs(0)),
    "GQA (K=2)": aj.nn.MultiHeadAttention(D, num_heads=8, num_kv_heads=2, mask=causal, rngs=nnx.Rngs(0)),
    "MQA (K=1)": aj.nn.MultiHeadAttention(D, num_heads=8, num_kv_heads=1, mask=causal, rngs=nnx.Rngs(0)),
    "MLA": aj.nn.MultiHeadLatentAttention(D, num_heads=8, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                          v_head_dim=8, mask=causal, rngs=nnx.Rngs(0)),
    "Differential": aj.nn.DifferentialAttention(D, num_heads=4, mask=causal, rngs=nnx.Rngs(0)),
}
forward = nnx.jit(lambda layer, x, cache=None: layer(x, cache=cache))  # layer(x, cache=cache), compiled
print(f"{'module':<14}{'params':>8}{'cache elements / token':>26}")
for name, layer in layers.items():
    params = sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    cache = layer.init_cache(2, 64)
    y, cache = forward(layer, x, cache)
    print(f"{name:<14}{params:>8,}{cache.elements_per_token:>26}")"""),
    md("""\
Decoding with a cache gives exactly the outputs of one pass over the whole sequence: prefill a prompt, then
feed one token at a time."""),
    code("""\
layer = layers["GQA (K=2)"]
full = forward(layer, x)
cache = layer.init_cache(2, 32)
y_prefix, cache = forward(layer, x[:, :20], cache)
steps = [y_prefix]
for t in range(20, 32):
    y_t, cache = forward(layer, x[:, t : t + 1], cache)
    steps.append(y_t)
print("max |decode - full|:", float(jnp.max(jnp.abs(jnp.concatenate(steps, axis=1) - full))))"""),
    md("""\
## Linear, low-rank and sparse attention

Linear attention (Katharopoulos et al.) replaces the softmax with a feature map, so causal attention becomes a
recurrence with a fixed-size state; its parallel, chunked and recurrent forms agree. Performer approximates
the softmax with random features: the error falls as the number of features grows."""),
    code("""\
linear = aj.nn.LinearAttention(D, 4, causal=True, rngs=nnx.Rngs(0))
x_short = x[:, :12]
y = forward(linear, x_short)                          # the chunked form (training)
cache = linear.init_cache(2, 12)                      # the recurrent form: a fixed-size state is its cache
steps = []
for t in range(x_short.shape[1]):
    y_t, cache = forward(linear, x_short[:, t : t + 1], cache)
    steps.append(y_t)
print("linear attention, recurrent vs chunked:", float(jnp.max(jnp.abs(jnp.concatenate(steps, 1) - y))))

from attention_jax.functional.performer import orthogonal_random_features, performer_attention

q = jax.random.normal(jax.random.key(3), (1, 128, 1, 16)) * 0.5
k = jax.random.normal(jax.random.key(4), (1, 128, 1, 16)) * 0.5
v = jax.random.normal(jax.random.key(5), (1, 128, 1, 16))
exact = aj.dot_product_attention(q, k, v)
performer = jax.jit(performer_attention)
features = [16, 64, 256] if SMALL else [16, 32, 64, 128, 256, 512]
errors = []
for m in features:
    err = []
    for seed in range(4):
        projection = orthogonal_random_features(jax.random.key(seed), m, 16)  # [M, H]
        err.append(float(jnp.mean(jnp.abs(performer(q, k, v, projection=projection) - exact))))
    errors.append(np.mean(err))
plt.figure(figsize=(4, 3))
plt.loglog(features, errors, "o-")
plt.xlabel("random features"), plt.ylabel("mean |error|"), plt.title("Performer vs softmax attention")
plt.show()"""),
    code("""\
T = 256 if SMALL else 1024
x_long = jax.random.normal(jax.random.key(6), (1, T, D))
others = {
    "Linformer (k=64)": aj.nn.Linformer(D, 4, max_length=T, projected_length=64, rngs=nnx.Rngs(0)),
    "Nystromformer (32 landmarks)": aj.nn.Nystromformer(D, 4, num_landmarks=32, rngs=nnx.Rngs(0)),
    "Longformer (window 32, global [0])": aj.nn.LongformerAttention(D, 4, window=32, global_tokens=(0,),
                                                                    rngs=nnx.Rngs(0)),
    "BigBird (blocks of 32)": aj.nn.BigBirdAttention(D, 4, block=32, rngs=nnx.Rngs(0)),
    "Performer": aj.nn.Performer(D, 4, rngs=nnx.Rngs(0)),
    "LinearAttention": aj.nn.LinearAttention(D, 4, rngs=nnx.Rngs(0)),
}
for name, layer in others.items():
    print(f"{name:<36} -> {forward(layer, x_long).shape}")"""),
    md("""\
## Any variant in any stack

Every attention module follows one protocol (`aj.nn.AttentionLayer`): the same call keywords (`mask`,
`positions`, `segment_ids`, `lengths`, `cache`, ...), the same return convention and `init_cache`. So a
stack takes any of them through a factory `factory(features, rngs=...)`, and `aj.generate` decodes with
any that can decode causally; a variant that cannot honour an argument says so with a `ValueError`."""),
    code("""\
import functools

factories = {
    "MultiHeadAttention (GQA)": functools.partial(aj.nn.MultiHeadAttention, num_heads=4, num_kv_heads=2),
    "LongformerAttention": functools.partial(aj.nn.LongformerAttention, num_heads=4, window=4),
    "DifferentialAttention": functools.partial(aj.nn.DifferentialAttention, num_heads=2),
    "LinearAttention": functools.partial(aj.nn.LinearAttention, num_heads=4),
    "Performer": functools.partial(aj.nn.Performer, num_heads=4),
    "FastWeightProgrammer": functools.partial(aj.nn.FastWeightProgrammer, num_heads=4),
}
prompt = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])                       # [B, T] token ids
for name, factory in factories.items():
    lm = aj.nn.TransformerLM(50, 32, 1, attention=factory, rngs=nnx.Rngs(0))   # vocabulary, width, layers
    tokens = aj.generate(lm, prompt, max_new_tokens=4)[0].tolist()
    print(f"{name:<26} logits {forward(lm, prompt).shape}, generated {tokens}")"""),
    md("""\
## Recurrent-era attention

Bahdanau's additive score and Luong's multiplicative ones, as used by an RNN encoder-decoder
(`aj.nn.Seq2SeqWithAttention`; `examples/seq2seq_alignment.py` trains one)."""),
    code("""\
model = aj.nn.Seq2SeqWithAttention(10, 12, embed_features=16, hidden_features=32, attention="additive",
                                   rngs=nnx.Rngs(0))
logits, alignment = model(jnp.ones((2, 7), jnp.int32), jnp.ones((2, 5), jnp.int32))
print("logits", logits.shape, "alignment [B, T, S]", alignment.shape, "rows sum to", alignment.sum(-1)[0])"""),
    md("""\
## Which variant can recall?

`examples/train_lm.py --compare` trains a small language model with each variant on multi-query associative
recall and prints a table of accuracy and step time; `examples/README.md` describes every example."""),
]

# --- 2. flash and ring attention ---------------------------------------------------------------------

FLASH_RING = [
    md("""\
Two ways to make exact attention cheaper in memory: **blockwise (flash) attention** computes one tile of
scores at a time with an online softmax and skips the tiles a mask rules out, and **ring attention** shards the
sequence over devices and passes key/value blocks around a ring.

To try ring attention without a cluster, ask XLA for 8 CPU devices. This must happen **before JAX is
imported** (on Colab: restart the runtime if JAX was already imported)."""),
    code(SMALL + """\
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import attention_jax as aj

print(jax.device_count(), "devices:", jax.devices()[:2], "...")"""),
    md("""\
## Blockwise attention equals the reference

`implementation="blockwise"` is the XLA blockwise path (the default fast path on CPU); `"reference"` materialises
every score. Outputs and gradients agree to float32 rounding."""),
    code("""\
T = 512 if SMALL else 2048
q = jax.random.normal(jax.random.key(0), (1, T, 8, 64))    # [B, T, N, H]
kv = jax.random.normal(jax.random.key(1), (1, T, 2, 64))   # [B, S, K, H]
mask = aj.masks.causal()


def run(implementation):
    f = jax.jit(lambda q, kv: aj.dot_product_attention(q, kv, kv, mask=mask, implementation=implementation))
    out = f(q, kv).block_until_ready()
    start = time.perf_counter()
    for _ in range(3):
        f(q, kv).block_until_ready()
    return out, (time.perf_counter() - start) / 3


ref, t_ref = run("reference")
out, t_blk = run("blockwise")
print(f"max |blockwise - reference| = {float(jnp.max(jnp.abs(out - ref))):.1e}")
print(f"reference {1e3 * t_ref:.1f} ms, blockwise {1e3 * t_blk:.1f} ms (T={T})")

loss = lambda impl: lambda q: aj.dot_product_attention(q, kv, kv, mask=mask, implementation=impl).sum()
g_ref, g_blk = jax.grad(loss("reference"))(q), jax.grad(loss("blockwise"))(q)
print(f"max |dq difference| = {float(jnp.max(jnp.abs(g_ref - g_blk))):.1e}")"""),
    md("""\
## Skipping tiles

A mask's block map marks each `[block_q, block_k]` tile empty (skipped), partial (masked elementwise) or full
(no mask arithmetic). A causal mask visits about half the tiles; a sliding window a band whose area grows
linearly with `T`."""),
    code("""\
T, block = 2048, 128
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
for ax, (name, m) in zip(axes, {
    "causal": aj.masks.causal(),
    "causal & window(256)": aj.masks.causal() & aj.masks.sliding_window(256),
    "chunked(512)": aj.masks.chunked(512),
}.items()):
    bm = m.block_map(T, T, block, block)
    ax.imshow(bm, cmap="viridis", vmin=0, vmax=2)
    ax.set_title(f"{name}: {np.mean(bm > 0):.0%} of tiles", fontsize=9)
    ax.set_xlabel("key block"), ax.set_ylabel("query block")
plt.show()"""),
    md("""\
## Ring attention on 8 devices

`aj.sequence_parallel_attention` takes global arrays and a mesh, shards the sequence over a mesh axis, and runs
the ring inside `shard_map`. The result equals single-device attention."""),
    code("""\
mesh = jax.make_mesh((8,), ("sp",))
T = 1024 if SMALL else 4096
q = jax.random.normal(jax.random.key(2), (1, T, 4, 32))
kv = jax.random.normal(jax.random.key(3), (1, T, 2, 32))
out = aj.sequence_parallel_attention(q, kv, kv, mesh=mesh, axis="sp", mask=aj.masks.causal())
ref = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal())
error = float(jnp.max(jnp.abs(out - ref)))
print(f"T={T} over {mesh.shape['sp']} devices: max |ring - single device| = {error:.1e}")"""),
    md("""\
With a causal mask and contiguous shards, the device holding the end of the sequence does most of the work. The
*zigzag* and *striped* layouts give every device an early and a late part of the sequence, so the work is
balanced; the result is returned in the original order either way."""),
    code("""\
from attention_jax.distributed import blocks_per_device

layouts = ["contiguous", "zigzag", "striped"]
fig, ax = plt.subplots(figsize=(7, 3))
for i, layout in enumerate(layouts):
    load = blocks_per_device(aj.masks.causal(), 4096, 8, layout, block=128)
    ax.bar(np.arange(8) + 0.27 * (i - 1), load, width=0.27, label=layout)
ax.set_xlabel("device"), ax.set_ylabel("tiles computed"), ax.legend(), ax.set_title("causal ring attention, T=4096")
plt.show()

for layout in layouts:
    out = aj.sequence_parallel_attention(q, kv, kv, mesh=mesh, axis="sp", mask=aj.masks.causal(), layout=layout)
    print(f"{layout:<11} max |error| = {float(jnp.max(jnp.abs(out - ref))):.1e}")"""),
    md("""\
## Pallas kernels

On a GPU or TPU, `implementation="pallas"` runs the Pallas flash-attention kernels (forward and backward) with
the same block maps. On a CPU the same kernel bodies run in Pallas' interpreter: exact but slow, meant for tests
and small inputs. A call a backend cannot serve raises a `ValueError` that says why:"""),
    code("""\
try:
    aj.dot_product_attention(q[:, :256], kv[:, :256], kv[:, :256], mask=aj.masks.causal(), implementation="pallas")
    print("pallas ran on", jax.default_backend())
except ValueError as e:
    print("ValueError:", e)"""),
]

# --- 3. attention maps -------------------------------------------------------------------------------

MAPS = [
    md("""\
Attention weights are a window into a model, with caveats: a single layer's map ignores the residual stream and
the other layers, and it says nothing about *which class* a token supports. `attention_jax.explain` captures the
weights of any model built from `attention_jax.nn` (no code changes, fast paths kept) and offers the standard
corrections: **rollout** and **flow** (Abnar & Zuidema, 2020), **gradient-weighted relevance**
(Chefer et al., 2021), **CDAM** (class-discriminative attention maps, Brocki & Chung, 2023) and **Grad-CAM**.
We train a tiny Vision Transformer on scikit-learn's 8x8 digits."""),
    code(SMALL + """\
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import attention_jax as aj
from attention_jax import explain

digits = load_digits()
images = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1]
x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.2, random_state=0)"""),
    code("""\
model = aj.nn.VisionTransformer(image_size=8, patch_size=2, in_channels=1, num_classes=10, features=64, depth=4,
                                num_heads=4, rngs=nnx.Rngs(0))
epochs = 2 if SMALL else 30
steps = epochs * (len(x_train) // 64)
optimizer = nnx.Optimizer(model, optax.adamw(optax.warmup_cosine_decay_schedule(0, 2e-3, steps // 10, steps)),
                          wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


rng = np.random.default_rng(0)
for epoch in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(len(x_train) // 64):
        idx = order[i * 64 : (i + 1) * 64]
        loss = train_step(model, optimizer, x_train[idx], y_train[idx])
accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
print(f"test accuracy after {epochs} epochs: {accuracy:.3f}")"""),
    md("""\
## Capturing the weights

`explain.capture(model, inputs)` runs the model once with every attention module recording, and returns the
output and `{module path: weights [B, N, T, S]}`. Here `T = 17`: a class token and 16 patches."""),
    code("""\
images = jnp.asarray(x_test[:6])
logits, weights = explain.capture(model, images)
print({path: w.shape for path, w in weights.items()})
labels = ["cls"] + [f"{r},{c}" for r in range(4) for c in range(4)]
explain.plot_heads(weights[list(weights)[0]][0], x_labels=labels, y_labels=labels, title="first layer, image 0")"""),
    md("""\
## Rollout and flow

Rollout multiplies the head-averaged maps of all layers, each mixed with the identity to account for the
residual connection; flow solves a max-flow problem on the same graph. Both give, for the class token, a map
over the input patches."""),
    code("""\
pictures = np.asarray(images[..., 0])
predicted = np.asarray(jnp.argmax(logits, -1))
titles = [f"label {y}, said {p}" for y, p in zip(y_test[:6], predicted)]

rollout = explain.attention_rollout(weights)                 # [B, T, T]
explain.plot_patch_overlay(pictures, rollout[:, 0, 1:], titles=titles).suptitle("rollout (mean over heads)")"""),
    code("""\
sharp = explain.attention_rollout(weights, head_fusion="max", discard_ratio=0.5)
fig = explain.plot_patch_overlay(pictures, sharp[:, 0, 1:], titles=titles)
fig.suptitle("rollout (max over heads, discard 50%)")"""),
    code("""\
flow = explain.attention_flow(weights, query_index=0)        # [B, T]: max flow into the class token
explain.plot_patch_overlay(pictures, flow[:, 1:], titles=titles).suptitle("attention flow")"""),
    md("""\
## Class-discriminative maps: gradient-weighted relevance

Rollout is the same whatever class we ask about. Weighting each layer's attention by the gradient of a class
score (keeping the positive part, averaging over heads, then rolling out) gives a map *for that class*
(Chefer et al.). Below, for the same image: the evidence for the predicted class, and for another class."""),
    code("""\
def class_score(cls):
    return lambda out: jnp.sum(out * jax.nn.one_hot(cls, 10))


attn, grads = explain.attention_gradients(model, class_score(predicted), images)
relevance = explain.gradient_weighted_rollout(attn, grads)   # [B, T, T]
fig = explain.plot_patch_overlay(pictures, relevance[:, 0, 1:], titles=titles)
fig.suptitle("relevance for the predicted class")"""),
    code("""\
other = (predicted + 1) % 10
attn, grads = explain.attention_gradients(model, class_score(other), images)
relevance_other = explain.gradient_weighted_rollout(attn, grads)
titles_other = [f"evidence for {c}" for c in other]
fig = explain.plot_patch_overlay(pictures, relevance_other[:, 0, 1:], titles=titles_other)
fig.suptitle("relevance for another class")"""),
    md("""\
Grad-CAM, transplanted from CNNs: weight the channels of the patch tokens by their mean gradient, sum, and keep
the positive part. The tokens are those the last attention layer reads: after it, only the class token reaches
the classifier, so the other tokens of its output have no gradient."""),
    code("""\
acts, grads = explain.layer_gradients(model, class_score(predicted), images)  # [B, T, D] each
cam = explain.grad_cam(acts[:, 1:], grads[:, 1:])                              # drop the class token
explain.plot_patch_overlay(pictures, cam, titles=titles).suptitle("Grad-CAM at the last attention layer")"""),
    md("""\
## CDAM: class-discriminative attention maps

CDAM (Brocki & Chung, 2023) scores each token entering the last attention layer by gradient times input: the
token's channels times the gradient of the class score, summed. Unlike Grad-CAM the score keeps its sign
(red: evidence for the class, blue: against) and each token its own gradient; unlike the relevance above it
needs no attention weights, so it works with any attention module. `explain.cdam` returns `[B, T]`."""),
    code("""\
for_predicted = explain.cdam(model, class_score(predicted), images)[:, 1:]  # [B, 16]: the class token dropped
fig = explain.plot_patch_overlay(pictures, for_predicted, titles=titles, signed=True)
fig.suptitle("CDAM for the predicted class")
for_other = explain.cdam(model, class_score(other), images)[:, 1:]
fig = explain.plot_patch_overlay(pictures, for_other, titles=titles_other, signed=True)
fig.suptitle("CDAM for another class")"""),
    md("""\
## Attention over text

The same capture works for a language model. An untrained `TransformerLM` shows the causal structure; after
training, `examples/train_lm.py` draws these maps for a model that has learned associative recall."""),
    code("""\
lm = aj.nn.TransformerLM(32, 32, 2, num_heads=2, rngs=nnx.Rngs(0))
tokens = jnp.arange(12)[None] % 32
_, lm_weights = explain.capture(lm, tokens)
words = [f"t{i}" for i in range(12)]
explain.plot_attention(lm_weights[list(lm_weights)[-1]][0, 0], x_labels=words, y_labels=words,
                       title="last layer, head 0 (untrained)")"""),
    md("""\
## Load a model and look at its attention maps

`attention_jax.models` builds published architectures (Llama 3, Mistral, Qwen, Gemma, GPT-2, T5, ...) from
`aj.nn` pieces and reads Hugging Face checkpoint directories (`config.json` + safetensors, no torch);
`models.auto.from_pretrained(path)` picks the architecture from the directory's `model_type`. With downloaded
weights, point it at their directory. To stay offline, we write one here: a tiny random Qwen2-style model
(grouped-query attention, 4 query heads sharing 2 key-value heads; the second layer slides over a window)
saved with `to_pretrained`, then loaded back like any checkpoint."""),
    code("""\
import tempfile

from attention_jax.models import auto, llama

config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, model_type="qwen2", qkv_bias=True, sliding_window=3,
                           layer_types=("full_attention", "sliding_attention"))
checkpoint = tempfile.mkdtemp()
llama.to_pretrained(llama.build(config, rngs=nnx.Rngs(1)), config, checkpoint)
print(sorted(os.listdir(checkpoint)))

loaded = auto.from_pretrained(checkpoint)  # config.json says qwen2: models.llama reads it
tokens = jnp.arange(1, 13)[None]           # [1, T]: with real weights, the checkpoint's tokenizer gives these
_, loaded_weights = explain.capture(loaded, tokens)
print({path: w.shape for path, w in loaded_weights.items()})"""),
    md("""\
Every head of both layers. The weights are random, so the maps show only the structure the configuration
imposes: the first layer is causal, the second sees each query and the 3 tokens before it (Hugging Face's
`sliding_window=4`, which counts the query; the loader converts). Heads 0 and 1 share one key-value head,
as do heads 2 and 3."""),
    code("""\
for path, w in loaded_weights.items():
    explain.plot_heads(w[0], x_labels=words, y_labels=words, ncols=4,
                       title=f"{path} (rows: queries, columns: keys)")"""),
]


def notebooks() -> dict:
    """``{file name: notebook}`` of every notebook this script writes."""
    return {
        "01_attention_variants.ipynb": notebook("A tour of the attention variants", TOUR),
        "02_flash_and_ring_attention.ipynb": notebook("Flash (blockwise) and ring attention on a CPU", FLASH_RING),
        "03_attention_maps.ipynb": notebook("Attention maps as explanations", MAPS),
    }


def main() -> None:
    for name, nb in notebooks().items():
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
