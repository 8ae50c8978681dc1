"""An RNN encoder-decoder with attention learns a toy translation; its alignment matrix shows how it reads.

The "language pair": a source sentence is a string of lowercase letters; its translation is the same string
reversed and written in a shifted uppercase alphabet (``"abc" -> "DCB"`` with shift 1). The right alignment is
the anti-diagonal, and a model with attention (Bahdanau's additive score, or one of Luong's multiplicative
ones) finds it by itself. The example trains ``attention_jax.nn.Seq2SeqWithAttention`` with teacher forcing,
decodes held-out sentences greedily, prints a few, and saves the alignment of one as an image.

    python examples/seq2seq_alignment.py                          # additive (Bahdanau) attention, GRU
    python examples/seq2seq_alignment.py --attention general      # Luong's bilinear score
    python examples/seq2seq_alignment.py --cell lstm --attention dot
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from attention_jax import explain
from attention_jax import nn as ajnn

PAD, BOS, EOS = 0, 1, 2  # target ids; letters follow. Source ids: PAD, then letters.


def make_batch(rng: np.random.Generator, batch_size: int, args):
    """Source ``[B, S]``, decoder inputs and targets ``[B, T]`` (T = S + 1), lengths and a target mask."""
    s_max = args.max_length
    lengths = rng.integers(args.min_length, s_max + 1, batch_size)
    letters = rng.integers(0, args.alphabet, (batch_size, s_max))
    valid = np.arange(s_max)[None] < lengths[:, None]
    source = np.where(valid, letters + 1, PAD)
    translated = np.zeros((batch_size, s_max + 1), np.int32)  # the reversed, shifted letters, then EOS
    for b in range(batch_size):
        n = lengths[b]
        translated[b, :n] = (letters[b, :n][::-1] + args.shift) % args.alphabet + 3
        translated[b, n] = EOS
    decoder_inputs = np.concatenate([np.full((batch_size, 1), BOS), translated[:, :-1]], axis=1)
    target_mask = np.arange(s_max + 1)[None] <= lengths[:, None]  # the letters and the EOS
    return (source.astype(np.int32), decoder_inputs.astype(np.int32), translated, lengths.astype(np.int32),
            target_mask.astype(np.float32))


def source_text(ids) -> str:
    return "".join(string.ascii_lowercase[i - 1] for i in ids if i != PAD)


def target_text(ids) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        out.append(string.ascii_uppercase[i - 3] if i >= 3 else "?")
    return "".join(out)


@nnx.jit(static_argnums=3)
def greedy_decode(model, source, lengths, steps: int):
    """Feed the argmax back in: ``steps`` passes of the decoder over a growing, padded prefix."""
    inputs = jnp.zeros((source.shape[0], steps), jnp.int32).at[:, 0].set(BOS)
    for t in range(steps - 1):  # the RNN is causal: the padding after position t is never seen
        logits, _ = model(source, inputs, source_lengths=lengths)
        inputs = inputs.at[:, t + 1].set(jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32))
    logits, alignment = model(source, inputs, source_lengths=lengths)
    return jnp.argmax(logits, axis=-1), alignment  # [B, T], [B, T, S]


@nnx.jit
def train_step(model, optimizer, source, decoder_inputs, targets, lengths, mask):
    def loss_fn(model):
        logits, _ = model(source, decoder_inputs, source_lengths=lengths)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (losses * mask).sum() / mask.sum()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", default="additive", help="additive, dot, scaled_dot, general or concat")
    p.add_argument("--cell", default="gru", choices=("gru", "lstm"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--alphabet", type=int, default=12, help="letters in each alphabet (at most 26)")
    p.add_argument("--shift", type=int, default=3, help="the target alphabet is shifted by this")
    p.add_argument("--min-length", type=int, default=4)
    p.add_argument("--max-length", type=int, default=10)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("outputs"))
    args = p.parse_args(argv)
    if not 1 <= args.min_length <= args.max_length or not 2 <= args.alphabet <= 26:
        raise SystemExit("need 1 <= min-length <= max-length and 2 <= alphabet <= 26.")

    model = ajnn.Seq2SeqWithAttention(
        args.alphabet + 1, args.alphabet + 3, embed_features=32, hidden_features=args.hidden, cell=args.cell,
        attention=args.attention, rngs=nnx.Rngs(args.seed),
    )  # fmt: skip
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, args.steps // 20, args.steps)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule)), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    test = make_batch(np.random.default_rng(args.seed + 1000), 256, args)

    def evaluate():
        source, _, targets, lengths, mask = test
        predicted, alignment = greedy_decode(model, source, lengths, targets.shape[1])
        predicted = np.asarray(predicted)
        exact = np.all((predicted == targets) | (mask == 0), axis=1)
        return float(exact.mean()), predicted, np.asarray(alignment)

    print(f"toy translation: reverse {args.min_length}-{args.max_length} letters of a {args.alphabet}-letter "
          f"alphabet, shift by {args.shift}; {args.cell.upper()} with {args.attention} attention")
    start = time.perf_counter()
    with tqdm(total=args.steps, desc=args.attention, dynamic_ncols=True, file=sys.stdout) as bar:
        for step in range(1, args.steps + 1):
            source, decoder_inputs, targets, lengths, mask = make_batch(rng, args.batch_size, args)
            loss = train_step(model, optimizer, source, decoder_inputs, targets, lengths, mask)
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
            if step % max(1, args.steps // 4) == 0 or step == args.steps:
                bar.write(f"step {step:5d}  loss {float(loss):.4f}  held-out exact match {evaluate()[0]:.3f}")
    seconds = time.perf_counter() - start
    accuracy, predicted, alignment = evaluate()
    print(f"\nheld-out exact-match accuracy (greedy decoding): {accuracy:.3f} ({seconds:.0f} s)")
    source, _, targets, lengths, _ = test
    for b in range(4):
        print(f"  {source_text(source[b]):<12} -> {target_text(predicted[b]):<12} (expected {target_text(targets[b])})")

    # The alignment of the longest of the first few held-out sentences: rows are output letters (and EOS).
    b = int(np.argmax(lengths[:8]))
    n = int(lengths[b])
    out_labels = list(target_text(predicted[b])[: n]) + ["<eos>"]
    out_labels += ["?"] * (n + 1 - len(out_labels))
    fig = explain.plot_attention(alignment[b, : n + 1, :n], x_labels=list(source_text(source[b])),
                                 y_labels=out_labels[: n + 1],
                                 title=f"{args.attention} attention: alignment (rows: output, columns: source)")
    out_dir = args.out_dir / "seq2seq_alignment"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"alignment_{args.attention}.png", dpi=110)
    anti_diagonal = float(np.mean(alignment[b, np.arange(n), n - 1 - np.arange(n)]))
    metrics = dict(attention=args.attention, cell=args.cell, accuracy=accuracy, seconds=seconds,
                   anti_diagonal_weight=anti_diagonal)
    (out_dir / f"metrics_{args.attention}.json").write_text(json.dumps(metrics, indent=2))
    print(f"mean attention on the anti-diagonal (the true alignment): {anti_diagonal:.2f}")
    print(f"wrote {out_dir / f'alignment_{args.attention}.png'}")


if __name__ == "__main__":
    main()
