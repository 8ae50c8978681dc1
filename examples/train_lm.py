"""Train a small TransformerLM on multi-query associative recall (MQAR), on a laptop CPU in about two minutes.

The task (Arora et al., 2023, "Zoology"): a sequence lists key-value pairs, then asks for some of the keys
again; after each queried key the model must produce its value. It is the standard probe that separates
attention (which can look the key up) from fixed-size recurrent states and windows (which must have kept it):

    k17 v81 k3 v99 k42 v70 ... | k3 -> v99   k17 -> v81   k42 -> v70 ...

Batches are generated on the fly inside the jitted step. Training uses optax AdamW with linear warm-up and
cosine decay, shows a tqdm progress bar, evaluates periodically on fixed held-out batches, and writes a
checkpoint it can resume from. At the end it prints the accuracy and writes, under ``--out-dir``
(default ``outputs/``), ``train_lm/<variant>/``: ``loss.png``, ``attention.png`` (every head of the last layer
on one example), ``metrics.json`` and ``checkpoint/`` (the model and optimizer, through ``aj.checkpoint``).

    python examples/train_lm.py                               # MHA, about two minutes on 2 CPU cores
    python examples/train_lm.py --variant gqa --resume        # pick up where the last run stopped
    python examples/train_lm.py --variant sliding --window 8  # a window too short to see the keys fails
    python examples/train_lm.py --compare                     # every variant briefly: accuracy, ms/step
    python examples/train_lm.py --tiny                        # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import attention_jax as aj
from attention_jax import explain
from attention_jax import nn as ajnn


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run; a checkpoint only resumes a run with the same model and task."""

    variant: str = "mha"
    implementation: str | None = None
    # Task: ``num_pairs`` key-value pairs, then ``num_queries`` queried keys (with their values).
    num_pairs: int = 8
    num_queries: int = 8
    num_keys: int = 64
    num_values: int = 64
    # Model.
    features: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_features: int | None = 64  # a small MLP: the task is about attention
    window: int = 8
    # Optimisation.
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_batches: int = 4
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    # Curriculum: start with ``min_pairs`` pairs and double them whenever the training accuracy over the
    # last 50 steps passes ``advance_at``, up to ``num_pairs`` (evaluation always uses ``num_pairs``).
    min_pairs: int = 1
    advance_at: float = 0.9

    def seq_len(self, num_pairs: int | None = None) -> int:
        """Input length: the pairs and the query pairs, minus the last token (it is only a target)."""
        return 2 * ((num_pairs or self.num_pairs) + self.num_queries) - 1

    def curriculum(self) -> list[int]:
        """The numbers of pairs, easiest first: ``min_pairs``, doubled until ``num_pairs``."""
        stages = [min(self.min_pairs, self.num_pairs)]
        while stages[-1] < self.num_pairs:
            stages.append(min(2 * stages[-1], self.num_pairs))
        return stages

    def model_fields(self) -> dict:
        skip = {"steps", "eval_every", "eval_batches", "implementation"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# --- the task ---------------------------------------------------------------------------------------


def make_batch(key: jax.Array, cfg: Config, batch_size: int, num_pairs: int | None = None):
    """One MQAR batch: ``tokens [B, T]``, next-token ``targets [B, T]`` and ``weights [B, T]`` (1 at queries).

    Keys are distinct within a sequence and drawn from ``[0, num_keys)``; values from
    ``[num_keys, num_keys + num_values)``. Queries pick pairs with replacement: were every pair asked exactly
    once, the last answers would follow by elimination, a shortcut a model learns long before it learns to
    look the key up. The loss counts only the predictions right after a queried key.
    """
    k_keys, k_values, k_queries = jax.random.split(key, 3)
    p, q = num_pairs or cfg.num_pairs, cfg.num_queries
    keys = jnp.argsort(jax.random.uniform(k_keys, (batch_size, cfg.num_keys)), axis=-1)[:, :p]  # [B, P] distinct
    values = cfg.num_keys + jax.random.randint(k_values, (batch_size, p), 0, cfg.num_values)  # [B, P]
    asked = jax.random.randint(k_queries, (batch_size, q), 0, p)  # [B, Q]: with replacement, see the docstring
    q_keys = jnp.take_along_axis(keys, asked, axis=-1)
    q_values = jnp.take_along_axis(values, asked, axis=-1)
    context = jnp.stack([keys, values], axis=-1).reshape(batch_size, 2 * p)  # k1 v1 k2 v2 ...
    queries = jnp.stack([q_keys, q_values], axis=-1).reshape(batch_size, 2 * q)  # q1 a1 q2 a2 ...
    sequence = jnp.concatenate([context, queries], axis=1).astype(jnp.int32)  # [B, T + 1]
    tokens, targets = sequence[:, :-1], sequence[:, 1:]
    position = jnp.arange(cfg.seq_len(p))
    is_query = (position >= 2 * p) & ((position - 2 * p) % 2 == 0)  # [T]
    weights = jnp.broadcast_to(is_query, tokens.shape).astype(jnp.float32)
    return tokens, targets, weights


def token_labels(tokens, cfg: Config) -> list[str]:
    return [f"k{t}" if t < cfg.num_keys else f"v{t - cfg.num_keys}" for t in np.asarray(tokens).tolist()]


# --- the variants -----------------------------------------------------------------------------------


def _mha(cfg: Config, **options):
    return functools.partial(
        ajnn.MultiHeadAttention, num_heads=cfg.num_heads, rope=aj.positional.RoPE(),
        implementation=cfg.implementation, **options,
    )  # fmt: skip


def _mla(cfg: Config):
    head = cfg.features // cfg.num_heads
    return functools.partial(
        ajnn.MultiHeadLatentAttention, num_heads=cfg.num_heads, kv_lora_rank=cfg.features // 2,
        qk_nope_head_dim=head, qk_rope_head_dim=head // 2, v_head_dim=head, implementation=cfg.implementation,
    )  # fmt: skip


def _diff(cfg: Config):
    return functools.partial(
        ajnn.DifferentialAttention, num_heads=cfg.num_heads // 2, rope=aj.positional.RoPE(),
        implementation=cfg.implementation,
    )  # fmt: skip


def _mamba2(cfg: Config):
    """Mamba-2 with 2x inner channels in heads of 32 and a state of 16 per head."""
    return functools.partial(ajnn.Mamba2, head_dim=32, state_dim=16, chunk_size=16)


def _hybrid(cfg: Config):
    """Mamba-2 layers, then attention in the last: a list of per-layer factories (one layer: attention)."""
    return [_mamba2(cfg)] * (cfg.num_layers - 1) + [_mha(cfg)]


def _heads(cls, **options):
    """Any attention module of ``aj.nn`` drops into the stack as it is: the LM passes its causal mask."""
    return lambda cfg: functools.partial(cls, num_heads=cfg.num_heads, **options)


# name -> (what it is, cfg -> attention factory)
VARIANTS = {
    "mha": ("multi-head attention with RoPE", _mha),
    "gqa": ("grouped-query: 2 queries per K/V head", lambda c: _mha(c, num_kv_heads=c.num_heads // 2)),
    "mqa": ("multi-query: one K/V head", lambda c: _mha(c, num_kv_heads=1)),
    "sliding": ("sliding window of --window tokens", lambda c: _mha(c, sliding_window=c.window)),
    "mla": ("multi-head latent attention (DeepSeek-V2)", _mla),
    "diff": ("differential attention", _diff),
    "linear": ("linear attention, elu + 1 features", _heads(ajnn.LinearAttention)),
    "performer": ("Performer, FAVOR+ features", _heads(ajnn.Performer)),
    "delta": ("delta-rule fast weights", _heads(ajnn.FastWeightProgrammer)),
    "longformer": ("Longformer: --window tokens each side + 2 global", lambda c: functools.partial(
        ajnn.LongformerAttention, num_heads=c.num_heads, window=c.window, global_tokens=2)),
    "bigbird": ("BigBird: blocks of 4, window + global + random", lambda c: functools.partial(
        ajnn.BigBirdAttention, num_heads=c.num_heads, block=4, max_length=c.seq_len())),
    "sparse": ("Sparse Transformer, strided, stride 4", _heads(ajnn.SparseTransformerAttention, pattern="strided",
                                                                 stride=4)),
    "nsa": ("native sparse attention (DeepSeek)", _heads(
        ajnn.NativeSparseAttention, compress_block=4, compress_stride=2, select_block=4, num_selected=2, window=8)),
    "positional": ("learned positional attention gated with content", lambda c: functools.partial(
        ajnn.PositionalAttention, num_heads=c.num_heads, max_length=c.seq_len(), gated=True)),
    "mamba": ("Mamba: selective SSM, state 16/channel", lambda c: functools.partial(ajnn.Mamba,
                                                                                              state_dim=16)),
    "mamba2": ("Mamba-2 (SSD): heads of 32, state 16/head", _mamba2),
    "hybrid": ("Mamba-2 layers, mha in the last", _hybrid),
}
# Linformer and Nystromformer mix the whole sequence: they cannot be causal, so they have no place in an LM
# (a TransformerLM with them raises the protocol's ValueError naming the layer and the mask).


def build_model(cfg: Config) -> ajnn.TransformerLM:
    if cfg.variant not in VARIANTS:
        raise SystemExit(f"unknown variant {cfg.variant!r}; choose from {list(VARIANTS)}.")
    attention = VARIANTS[cfg.variant][1](cfg)
    return ajnn.TransformerLM(
        cfg.vocab_size, cfg.features, cfg.num_layers, attention=attention, num_heads=cfg.num_heads,
        mlp_features=cfg.mlp_features, tie_embeddings=False, rngs=nnx.Rngs(cfg.seed),  # untied: learns faster here
    )  # fmt: skip


# --- training ---------------------------------------------------------------------------------------


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.05
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def loss_and_accuracy(logits, targets, weights):
    """Cross-entropy and accuracy over the query positions only."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    total = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / total, (correct * weights).sum() / total


class Trainer:
    """Holds the model and its optimizer as one graph and one state, and the jitted steps that map the state."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        model = build_model(cfg)
        optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
        # The steps take and return the whole state as arrays (donated: updated in place), so jit sees plain
        # pytrees; nnx.merge rebuilds the modules inside the trace at no run-time cost.
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.step, self.stage = 0, 0  # stage: index into cfg.curriculum()
        self.history: dict[str, list] = {"step": [], "loss": [], "accuracy": [], "pairs": [], "eval_step": [],
                                         "eval_accuracy": []}
        data_key, eval_key = jax.random.split(jax.random.key(cfg.seed + 1))
        self.data_key = data_key
        self.eval_data = [make_batch(k, cfg, 256) for k in jax.random.split(eval_key, cfg.eval_batches)]
        self.train_step = jax.jit(self._train_step, static_argnums=2, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self.model(), nnx.Param)))

    def modules(self) -> tuple[ajnn.TransformerLM, nnx.Optimizer]:
        """The model and its optimizer, rebuilt from the current state."""
        return nnx.merge(self.graphdef, self.state)

    def model(self) -> ajnn.TransformerLM:
        return self.modules()[0]

    def _train_step(self, state, step, num_pairs):
        model, optimizer = nnx.merge(self.graphdef, state)
        key = jax.random.fold_in(self.data_key, step)
        tokens, targets, weights = make_batch(key, self.cfg, self.cfg.batch_size, num_pairs)

        def loss_fn(model):
            return loss_and_accuracy(model(tokens), targets, weights)  # logits [B, T, V]

        (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, accuracy

    def _eval_step(self, state, tokens, targets, weights):
        model, _ = nnx.merge(self.graphdef, state)
        return loss_and_accuracy(model(tokens), targets, weights)[1]

    def evaluate(self) -> float:
        return float(np.mean([self.eval_step(self.state, *batch) for batch in self.eval_data]))

    # Checkpoints: the model and its optimizer through aj.checkpoint (orbax: one directory per saved step,
    # written whole or not at all), with the curriculum stage, the history and the model-defining config as
    # metadata. The last two saved steps are kept.
    def save(self, directory: Path) -> None:
        meta = dict(stage=self.stage, history=self.history, config=self.cfg.model_fields())
        model, optimizer = self.modules()
        aj.checkpoint.save(directory, model, optimizer, step=self.step, metadata=meta, overwrite=True, max_to_keep=2)

    def restore(self, directory: Path) -> None:
        step = aj.checkpoint.latest_step(directory)
        meta = aj.checkpoint.read_metadata(directory, step)
        if meta.get("config") != self.cfg.model_fields():
            saved = meta.get("config", {})
            changed = {k for k in saved.keys() | self.cfg.model_fields().keys()
                       if saved.get(k) != self.cfg.model_fields().get(k)}
            raise SystemExit(f"{directory} was written by a different run (differs in {sorted(changed)}); "
                             "drop --resume or use another --out-dir.")
        model, optimizer = self.modules()
        self.step = aj.checkpoint.restore(directory, model, optimizer, step=step)
        self.state = nnx.state((model, optimizer))
        self.stage, self.history = meta["stage"], meta["history"]

    def train(self, *, checkpoint: Path | None = None, progress: bool = True, target_accuracy: float = 1.1):
        """Train to ``cfg.steps`` (from ``self.step``); returns the median seconds per step after compiling."""
        cfg = self.cfg
        times = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc=cfg.variant, leave=progress,
                   dynamic_ncols=True, file=sys.stdout)
        log = bar.write if progress else (lambda message: None)
        stages = cfg.curriculum()
        while self.step < cfg.steps:
            pairs = stages[self.stage]
            start = time.perf_counter()
            self.state, loss, accuracy = self.train_step(self.state, self.step, pairs)
            loss, accuracy = float(loss), float(accuracy)  # waits for the step: the time below is the step's
            times.append(time.perf_counter() - start)
            self.step += 1
            for name, value in (("step", self.step), ("loss", loss), ("accuracy", accuracy), ("pairs", pairs)):
                self.history[name].append(value)
            bar.update(1)
            if self.step % 10 == 0:
                bar.set_postfix(pairs=pairs, loss=f"{loss:.3f}", acc=f"{accuracy:.2f}")
            recent = self.history["accuracy"][-50:]
            if self.stage + 1 < len(stages) and len(recent) == 50 and min(self.history["pairs"][-50:]) == pairs \
                    and np.mean(recent) >= cfg.advance_at:
                self.stage += 1
                log(f"step {self.step:5d}  training accuracy {np.mean(recent):.2f} with {pairs} pairs: "
                          f"now {stages[self.stage]} pairs")
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                eval_accuracy = self.evaluate()
                self.history["eval_step"].append(self.step)
                self.history["eval_accuracy"].append(eval_accuracy)
                log(f"step {self.step:5d}  loss {loss:.4f}  eval accuracy {eval_accuracy:.3f}")
                if checkpoint is not None:
                    self.save(checkpoint)
                if eval_accuracy >= target_accuracy:
                    log(f"reached eval accuracy {eval_accuracy:.3f} >= {target_accuracy}: stopping early.")
                    break
        bar.close()
        return float(np.median(times[1:])) if len(times) > 1 else float("nan")


# --- outputs ----------------------------------------------------------------------------------------


def plot_history(history: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    steps, losses = np.asarray(history["step"]), np.asarray(history["loss"])
    ax_loss.plot(steps, losses, alpha=0.3, color="C0", label="per step")
    if len(losses) >= 20:
        smooth = np.convolve(losses, np.ones(20) / 20, mode="valid")
        ax_loss.plot(steps[19:], smooth, color="C0", label="mean of 20")
    pairs = np.asarray(history["pairs"])
    for i in np.flatnonzero(np.diff(pairs)) + 1:  # where the curriculum moved on
        ax_loss.axvline(steps[i], color="gray", lw=0.8, ls="--")
        ax_loss.annotate(f" {pairs[i]} pairs", (steps[i], 0.98), xycoords=("data", "axes fraction"), fontsize=8,
                         rotation=90, va="top")
    ax_loss.set(xlabel="step", ylabel="loss at the queries", yscale="log", title=title)
    ax_loss.legend()
    ax_acc.plot(history["eval_step"], history["eval_accuracy"], "o-", color="C1")
    ax_acc.set(xlabel="step", ylabel="eval accuracy", ylim=(0, 1.02), title="held-out recall accuracy")
    ax_acc.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def plot_example_attention(trainer: Trainer, path: Path) -> bool:
    """Every head of the last layer on one held-out example; False if the variant records no weights."""
    tokens = trainer.eval_data[0][0][:1]  # [1, T]
    try:
        _, weights = explain.capture(trainer.model(), tokens)
    except ValueError:
        return False
    last = list(weights)[-1]
    labels = token_labels(tokens[0], trainer.cfg)
    # At most 8 maps: Mamba records one per channel.
    fig = explain.plot_heads(weights[last][0][:8], x_labels=labels, y_labels=labels, ncols=2,
                             title=f"{trainer.cfg.variant}: {last} (rows: queries, columns: keys)")
    fig.savefig(path, dpi=110)
    return True


# --- the command line -------------------------------------------------------------------------------


def run_one(cfg: Config, out_dir: Path, *, resume: bool, target_accuracy: float) -> dict:
    run_dir = out_dir / "train_lm" / cfg.variant
    checkpoint = run_dir / "checkpoint"
    trainer = Trainer(cfg)
    print(f"variant {cfg.variant} ({VARIANTS[cfg.variant][0]}), {trainer.num_params:,} parameters, "
          f"sequence length {cfg.seq_len()}, {cfg.steps} steps of {cfg.batch_size}; pairs {cfg.curriculum()}; "
          f"backend {jax.default_backend()}")
    if resume and aj.checkpoint.latest_step(checkpoint) is not None:
        trainer.restore(checkpoint)
        print(f"resumed from {checkpoint} at step {trainer.step}")
    else:
        if resume:
            print(f"no checkpoint at {checkpoint}: starting fresh")
        if checkpoint.exists():  # a fresh run: the old run's steps must not be resumed later as if they were ours
            print(f"removing the previous run's checkpoints in {checkpoint}")
            shutil.rmtree(checkpoint)
    start = time.perf_counter()
    step_time = trainer.train(checkpoint=checkpoint, target_accuracy=target_accuracy)
    wall = time.perf_counter() - start
    accuracy = trainer.history["eval_accuracy"][-1] if trainer.history["eval_accuracy"] else trainer.evaluate()
    plot_history(trainer.history, run_dir / "loss.png", f"{cfg.variant}: MQAR training loss")
    has_map = plot_example_attention(trainer, run_dir / "attention.png")
    metrics = dict(variant=cfg.variant, accuracy=accuracy, step=trainer.step, seconds=wall,
                   ms_per_step=1e3 * step_time, params=trainer.num_params, final_loss=trainer.history["loss"][-1])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nheld-out recall accuracy: {accuracy:.3f} after {trainer.step} steps ({wall:.0f} s, "
          f"{1e3 * step_time:.1f} ms/step)")
    print(f"wrote {run_dir / 'loss.png'}" + (f", {run_dir / 'attention.png'}" if has_map else
                                             " (this variant has no attention weights to plot)")
          + f", {run_dir / 'metrics.json'} and {checkpoint}")
    return metrics


def compare(base: Config, variants: list[str], out_dir: Path) -> list[dict]:
    rows = []
    for variant in variants:
        cfg = dataclasses.replace(base, variant=variant)
        trainer = Trainer(cfg)
        step_time = trainer.train(progress=False)
        history = trainer.history
        reached = [s for s, a in zip(history["eval_step"], history["eval_accuracy"]) if a >= 0.9]
        rows.append(dict(variant=variant, params=trainer.num_params, accuracy=history["eval_accuracy"][-1],
                         steps_to_90=reached[0] if reached else None, ms_per_step=1e3 * step_time))
        print(f"  {variant:<10} accuracy {rows[-1]['accuracy']:.3f}  {1e3 * step_time:6.1f} ms/step", flush=True)
    print(f"\nMQAR, {base.num_pairs} pairs, {base.steps} steps each, batch {base.batch_size}, "
          f"backend {jax.default_backend()}:\n")
    print(f"| {'variant':<10} | {'what':<42} | {'params':>8} | {'accuracy':>8} | {'90% at':>6} | {'ms/step':>7} |")
    print(f"|{'-' * 12}|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 9}|")
    for r in rows:
        reached = "-" if r["steps_to_90"] is None else str(r["steps_to_90"])
        print(f"| {r['variant']:<10} | {VARIANTS[r['variant']][0]:<42} | {r['params']:>8,} | "
              f"{r['accuracy']:>8.3f} | {reached:>6} | {r['ms_per_step']:>7.2f} |")
    print("\nA softmax variant at chance has not yet left the plateau before the lookup is learned (its length "
          "varies\nwith the seed): try more --steps or another --seed. Fixed-size states (linear, performer, delta, "
          "mamba,\nmamba2) and short windows (sliding) are limited by what they can keep, not by the plateau.")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_lm_compare.json").write_text(json.dumps(rows, indent=2))
    return rows


TINY = dict(steps=30, batch_size=16, eval_every=15, eval_batches=1, warmup_steps=5, num_pairs=4, num_queries=4,
            num_keys=16, num_values=16, features=32)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = Config()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variant", default=defaults.variant, help=f"one of {list(VARIANTS)}")
    p.add_argument("--implementation", default=None,
                   help="attention implementation of the softmax variants: reference, blockwise, pallas, cudnn "
                        "(default: chosen by backend and shape)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--num-pairs", type=int, default=defaults.num_pairs, help="key-value pairs per sequence")
    p.add_argument("--num-queries", type=int, default=None, help="queried keys per sequence (default: all pairs)")
    p.add_argument("--window", type=int, default=defaults.window, help="window of the sliding variant")
    p.add_argument("--features", type=int, default=defaults.features)
    p.add_argument("--num-layers", type=int, default=defaults.num_layers)
    p.add_argument("--num-heads", type=int, default=defaults.num_heads)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out-dir", type=Path, default=Path("outputs"))
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest step in <out-dir>/train_lm/<variant>/checkpoint/")
    p.add_argument("--target-accuracy", type=float, default=1.1,
                   help="stop early once the eval accuracy reaches this (default: never)")
    p.add_argument("--compare", action="store_true", help="train each of --variants briefly and print a table")
    p.add_argument("--variants", default=None, help="comma-separated variants for --compare (default: all)")
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny task and model, 30 steps (for tests)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config(
        variant=args.variant, implementation=args.implementation, batch_size=args.batch_size,
        learning_rate=args.learning_rate, num_pairs=args.num_pairs, window=args.window, features=args.features,
        num_layers=args.num_layers, num_heads=args.num_heads, seed=args.seed,
    )  # fmt: skip
    if args.tiny:
        cfg = dataclasses.replace(cfg, **TINY)
    if args.compare and not args.tiny:
        cfg = dataclasses.replace(cfg, eval_every=100, eval_batches=2)
    updates = dict(steps=args.steps, eval_every=args.eval_every)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in updates.items() if v is not None})
    num_queries = cfg.num_pairs if args.num_queries is None else args.num_queries
    if not 1 <= num_queries <= cfg.num_pairs or cfg.num_pairs > cfg.num_keys:
        raise SystemExit(f"need 1 <= num_queries <= num_pairs <= num_keys, got {num_queries}, {cfg.num_pairs}, "
                         f"{cfg.num_keys}.")
    return dataclasses.replace(cfg, num_queries=num_queries, eval_every=min(cfg.eval_every, cfg.steps))


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = config_from(args)
    if args.compare:
        variants = args.variants.split(",") if args.variants else list(VARIANTS)
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}.")
        compare(cfg, variants, args.out_dir)
    else:
        run_one(cfg, args.out_dir, resume=args.resume, target_accuracy=args.target_accuracy)


if __name__ == "__main__":
    main()
