"""A small Vision Transformer on scikit-learn's bundled 8x8 digits, then attention maps of its decisions.

The 1,797 digits ship with scikit-learn (no download). Each 8x8 image is cut into 2x2 patches (16 tokens plus a
class token); a 4-block ViT reaches about 97% test accuracy in a minute or two on a laptop CPU. Then, for a
few test images, it draws where the class token looks and what speaks for the predicted class (see
``attention_jax.explain``):

* attention rollout and attention flow (Abnar & Zuidema, 2020): the head-averaged maps with the residual;
* the gradient-weighted relevance of Chefer et al. (2021), class-specific (when the modules support it);
* CDAM, class-discriminative attention maps (Brocki & Chung, 2023): gradient times input of the tokens the
  last attention layer reads, signed (evidence for and against the class);
* Grad-CAM at the last attention layer (on the tokens it reads).

    python examples/vit_digits.py                 # trains, prints test accuracy, writes outputs/vit_digits/*.png
    python examples/vit_digits.py --epochs 2      # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from attention_jax import explain
from attention_jax import nn as ajnn

PATCH = 2


def load_digits(seed: int):
    """Train/test split (80/20, stratified) of the 8x8 digits as ``[N, 8, 8, 1]`` float32 in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(images, digits.target.astype(np.int32), test_size=0.2, random_state=seed,
                            stratify=digits.target)


def augment(key, images):
    """Random shifts by up to one pixel (zero padding): a cheap way to see more digits."""
    b = images.shape[0]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = jax.random.randint(key, (b, 2), 0, 3)
    crop = lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), (8, 8, 1))
    return jax.vmap(crop)(padded, shifts)


def build_model(args) -> ajnn.VisionTransformer:
    return ajnn.VisionTransformer(
        image_size=8, patch_size=PATCH, in_channels=1, num_classes=10, features=args.features, depth=args.depth,
        num_heads=args.num_heads, rngs=nnx.Rngs(args.seed),
    )  # fmt: skip


def train(args, x_train, y_train, x_test, y_test):
    model = build_model(args)
    steps_per_epoch = len(x_train) // args.batch_size
    total = args.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, min(100, total // 10), total)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    def logits_of(params, images):
        return nnx.merge(graphdef, params, rest)(images)

    @jax.jit
    def step(params, opt_state, key, images, labels):
        if args.augment:
            images = augment(key, images)

        def loss_fn(params):
            targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), args.label_smoothing)
            return optax.softmax_cross_entropy(logits_of(params, images), targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    accuracy = jax.jit(lambda params, x, y: jnp.mean(jnp.argmax(logits_of(params, x), -1) == y))
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    start = time.perf_counter()
    with tqdm(total=total, desc="vit", dynamic_ncols=True, file=sys.stdout) as bar:
        for epoch in range(args.epochs):
            order = rng.permutation(len(x_train))
            for i in range(steps_per_epoch):
                idx = order[i * args.batch_size : (i + 1) * args.batch_size]
                key, sub = jax.random.split(key)
                params, opt_state, loss = step(params, opt_state, sub, x_train[idx], y_train[idx])
                bar.update(1)
            test_acc = float(accuracy(params, x_test, y_test))
            bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{test_acc:.3f}")
            if (epoch + 1) % max(1, args.epochs // 5) == 0 or epoch + 1 == args.epochs:
                bar.write(f"epoch {epoch + 1:3d}  loss {float(loss):.4f}  test accuracy {test_acc:.3f}")
            if test_acc >= args.target_accuracy:
                bar.write(f"epoch {epoch + 1:3d}: test accuracy {test_acc:.3f} >= {args.target_accuracy}, stopping.")
                break
    return nnx.merge(graphdef, params, rest), test_acc, time.perf_counter() - start


def explain_images(model, images, labels, out_dir: Path) -> list[str]:
    """Rollout, flow, gradient-weighted relevance, CDAM and Grad-CAM of the class token for ``images [B, 8, 8, 1]``."""
    logits, weights = explain.capture(model, images)
    predicted = np.asarray(jnp.argmax(logits, -1))
    titles = [f"label {int(y)}, said {int(p)}" for y, p in zip(labels, predicted)]
    pictures = np.asarray(images[..., 0])
    written = []

    def save(name, patch_map, heading, signed=False):
        fig = explain.plot_patch_overlay(pictures, np.asarray(patch_map), titles=titles, signed=signed)
        fig.suptitle(heading)
        fig.savefig(out_dir / name, dpi=110)
        written.append(name)

    rollout = explain.attention_rollout(weights)  # [B, T, T]
    save("rollout.png", rollout[:, 0, 1:], "attention rollout of the class token")
    flow = explain.attention_flow(weights, query_index=0)  # [B, T]
    save("flow.png", flow[:, 1:], "attention flow into the class token")

    score = lambda out: jnp.sum(out * jax.nn.one_hot(predicted, out.shape[-1]))  # each image's predicted class
    try:
        attn, grads = explain.attention_gradients(model, score, images)
    except NotImplementedError as e:
        print(f"skipping the gradient-weighted map: {e}")
    else:
        relevance = explain.gradient_weighted_rollout(attn, grads)
        save("relevance.png", relevance[:, 0, 1:], "gradient-weighted relevance (Chefer et al.) of the class token")
    cdam = explain.cdam(model, score, images)  # [B, T]: one signed score per token
    save("cdam.png", cdam[:, 1:], "CDAM for the predicted class (red: for, blue: against)", signed=True)
    acts, grads = explain.layer_gradients(model, score, images)  # the tokens entering the last attention layer
    save("grad_cam.png", explain.grad_cam(acts[:, 1:], grads[:, 1:]), "Grad-CAM at the last attention layer")

    last = list(weights)[-1]
    labels16 = ["cls"] + [f"{r},{c}" for r in range(8 // PATCH) for c in range(8 // PATCH)]
    fig = explain.plot_heads(weights[last][0], x_labels=labels16, y_labels=labels16, title=f"{last}, image 0")
    fig.savefig(out_dir / "heads.png", dpi=110)
    written.append("heads.png")
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random shifts of one pixel (default on)")
    p.add_argument("--num-images", type=int, default=6, help="test images to explain")
    p.add_argument("--target-accuracy", type=float, default=1.1,
                   help="stop after the first epoch whose test accuracy reaches this (default: train every epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("outputs"))
    args = p.parse_args(argv)

    x_train, x_test, y_train, y_test = load_digits(args.seed)
    print(f"digits: {len(x_train)} train, {len(x_test)} test images of 8x8; {(8 // PATCH) ** 2} patches of "
          f"{PATCH}x{PATCH}; backend {jax.default_backend()}")
    model, test_acc, seconds = train(args, x_train, y_train, x_test, y_test)
    print(f"\ntest accuracy: {test_acc:.3f} ({seconds:.0f} s)")
    out_dir = args.out_dir / "vit_digits"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = explain_images(model, jnp.asarray(x_test[: args.num_images]), y_test[: args.num_images], out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(dict(test_accuracy=test_acc, seconds=seconds), indent=2))
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")


if __name__ == "__main__":
    main()
