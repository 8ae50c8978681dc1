"""Prefill + decode with every KV-cache kind, printing tokens per second and the cache's size.

A small ``TransformerLM`` (random weights: this is about speed and memory, not text) whose odd layers use a
sliding window generates greedily from a batch of prompts with ``attention_jax.generate``. The cache kinds:

* ``dense``: one fixed-capacity buffer per sequence (``KVCache``);
* ``rolling``: a ring buffer of the window for the sliding-window layers (``RollingKVCache``), dense elsewhere;
* ``paged``: a shared pool of fixed-size pages with a page table per sequence (``PagedKVCache``);

each also with int8 keys and values (``quantized``). The loop is written out by hand (one prefill call, then one
jitted call per token, the cache donated so it updates in place) to time the two phases apart; greedy decoding
is deterministic, so every exact cache must reproduce the tokens of the library's ``aj.generate`` (its
prefill and decode under one ``jax.lax`` loop); int8 may drift once two logits are close.

    python examples/generate.py
    python examples/generate.py --batch-size 1 --prompt-length 512 --new-tokens 256

With ``--checkpoint DIR`` it generates instead from a Hugging Face checkpoint directory (``config.json`` +
safetensors, e.g. downloaded weights) of any architecture ``attention_jax.models.auto`` loads: Llama 3,
Mistral, Qwen2/3, Gemma 2/3, GPT-2, T5 (the prompt goes to the encoder), DeepSeek-V3, gpt-oss. The prompt is
``--prompt-ids`` (token ids), or ``--prompt TEXT`` when ``DIR`` holds a tokenizer and ``transformers`` is
installed (then the output is decoded too):

    python examples/generate.py --checkpoint ~/models/Qwen3-0.6B --prompt "The capital of France is"
    python examples/generate.py --checkpoint ~/models/Llama-3.2-1B --prompt-ids 128000,791,6864 --new-tokens 16
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention_jax as aj
from attention_jax import nn as ajnn

KINDS = [("dense", False), ("rolling", False), ("paged", False), ("dense", True), ("rolling", True), ("paged", True)]


def build_model(args) -> ajnn.TransformerLM:
    def attention(depth):
        return functools.partial(
            ajnn.MultiHeadAttention, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
            rope=aj.positional.RoPE(), sliding_window=args.window if depth % 2 else None,
        )  # fmt: skip

    return ajnn.TransformerLM(
        args.vocab_size, args.features, args.num_layers, attention=[attention(i) for i in range(args.num_layers)],
        rngs=nnx.Rngs(args.seed),
    )  # fmt: skip


def greedy_step(graphdef, state, tokens, cache):
    """Run ``tokens [B, T]`` through the model with its cache; return the next greedy token ``[B]`` and the cache."""
    logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)  # [B, T, V]
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def prefill_and_decode(model, prompt, new_tokens: int, kind: str, quantized: bool):
    """Greedy generation by hand: one prefill call, then one call per new token. Returns tokens and timings."""
    graphdef, state = nnx.split(model)
    # The step closes over the graph: a static jit argument would be hashed again at every token.
    step = jax.jit(functools.partial(greedy_step, graphdef), donate_argnums=2)
    b, t = prompt.shape
    cache = model.init_cache(b, t + new_tokens, kind=kind, quantized=quantized)
    cache = jax.tree.map(jnp.copy, cache)  # own buffers: a fresh cache may share its zeros, and we donate them
    start = time.perf_counter()
    token, cache = step(state, prompt, cache)
    token.block_until_ready()
    prefill = time.perf_counter() - start
    out = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token, cache = step(state, token[:, None], cache)
        out.append(token)
    token.block_until_ready()
    decode = (time.perf_counter() - start) / max(new_tokens - 1, 1)
    return np.stack([np.asarray(x) for x in out], axis=1), prefill, decode


def cache_bytes(model, args, kind: str, quantized: bool) -> int:
    caches = model.init_cache(args.batch_size, args.prompt_length + args.new_tokens, kind=kind, quantized=quantized)
    return sum(x.nbytes for x in jax.tree.leaves(caches))


# --- --checkpoint: generation from a Hugging Face checkpoint directory ------------------------------


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer through ``transformers``, or None (no tokenizer files, or no transformers)."""
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                          "spiece.model", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def prompt_ids(args, tokenizer, config: dict) -> list[int]:
    """The prompt's token ids: ``--prompt-ids``, ``--prompt`` through the tokenizer, or the BOS token alone."""
    if args.prompt_ids is not None and args.prompt is not None:
        raise SystemExit("give either --prompt or --prompt-ids, not both.")
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"--prompt needs a tokenizer: {args.checkpoint} has no tokenizer files (tokenizer.json, "
                             "tokenizer_config.json, ...) or the transformers package is not installed. Pass token "
                             "ids instead, e.g. --prompt-ids 1,2,3.")
        return list(tokenizer(args.prompt)["input_ids"])
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}.") from None
        if not ids:
            raise SystemExit("--prompt-ids is empty.")
        return ids
    bos = config.get("bos_token_id")
    if isinstance(bos, int):
        print(f"no --prompt or --prompt-ids: starting from the BOS token ({bos})")
        return [bos]
    raise SystemExit("give a prompt: --prompt-ids 1,2,3 (token ids), or --prompt TEXT if the checkpoint directory "
                     "holds a tokenizer and transformers is installed.")


def generate_from_checkpoint(args) -> list[int]:
    """Load ``--checkpoint``, generate ``--new-tokens`` after the prompt; print (and return) the new token ids."""
    from attention_jax.models import auto, t5
    from attention_jax.models._loading import read_config

    directory = Path(args.checkpoint)
    config = read_config(directory)
    tokenizer = load_tokenizer(directory)
    ids = prompt_ids(args, tokenizer, config)
    start = time.perf_counter()
    model = auto.from_pretrained(directory, dtype=jnp.dtype(args.dtype))
    load = time.perf_counter() - start
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if vocab is not None and not all(0 <= i < vocab for i in ids):
        raise SystemExit(f"prompt token ids must lie in [0, {vocab}) (the vocabulary), got {ids}.")
    prompt = jnp.asarray([ids], jnp.int32)  # [1, T]
    options = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                   rng=jax.random.key(args.seed), cache_kind=args.cache)  # fmt: skip
    start = time.perf_counter()
    if isinstance(model, t5.T5Model):  # encoder-decoder: the prompt is the encoder's input
        context = model.encode(prompt)  # [1, S, D]
        first = jnp.full((1, 1), config.get("decoder_start_token_id", 0), jnp.int32)
        tokens = aj.generate(model, first, model_inputs={"context": context}, **options)
    elif isinstance(model, ajnn.TransformerLM):
        tokens = aj.generate(model, prompt, **options)
    else:
        raise SystemExit(f"{directory} holds a {config['model_type']} model ({type(model).__name__}): an encoder, "
                         "which has nothing to generate. Language models and T5 generate.")
    new = np.asarray(tokens[0]).tolist()
    seconds = time.perf_counter() - start
    eos = config.get("eos_token_id")
    eos = set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()
    stop = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))  # cut after the first end-of-sequence
    new = new[:stop]
    print(f"{config['model_type']} ({type(model).__name__}) from {directory}, loaded in {load:.1f} s; "
          f"{len(new)} new tokens in {seconds:.1f} s (compilation included), backend {jax.default_backend()}")
    print(f"prompt ids: {ids}")
    print(f"new ids:    {new}")
    if tokenizer is not None:
        print(f"text: {tokenizer.decode(ids)!r} -> {tokenizer.decode(new)!r}")
    out_dir = args.out_dir / "generate"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "checkpoint.json").write_text(json.dumps(dict(checkpoint=str(directory), prompt_ids=ids,
                                                             new_ids=new), indent=2))  # fmt: skip
    return new


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--window", type=int, default=32, help="sliding window of the odd layers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", default=None, help="comma-separated subset, e.g. dense,paged-int8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("outputs"))
    hf = p.add_argument_group("a Hugging Face checkpoint (with --checkpoint, --new-tokens, --seed and --out-dir "
                              "apply; the options describing the random model do not)")
    hf.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (config.json + safetensors)")
    hf.add_argument("--prompt-ids", default=None, help="comma-separated prompt token ids, e.g. 1,2,3")
    hf.add_argument("--prompt", default=None, help="prompt text (needs a tokenizer in DIR and transformers)")
    hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    hf.add_argument("--cache", default="dense", choices=["dense", "rolling", "paged"], help="KV-cache kind")
    hf.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    hf.add_argument("--top-p", type=float, default=None)
    args = p.parse_args(argv)
    if args.checkpoint is not None:
        generate_from_checkpoint(args)
        return

    model = build_model(args)
    prompt = jax.random.randint(jax.random.key(args.seed), (args.batch_size, args.prompt_length), 0, args.vocab_size)
    kinds = [(k, q) for k, q in KINDS if args.kinds is None or f"{k}{'-int8' if q else ''}" in args.kinds.split(",")]
    print(f"TransformerLM: {args.num_layers} layers of {args.features}, {args.num_heads} query / "
          f"{args.num_kv_heads} KV heads, window {args.window} on odd layers; batch {args.batch_size}, prompt "
          f"{args.prompt_length}, {args.new_tokens} new tokens; backend {jax.default_backend()}\n")
    expected = np.asarray(aj.generate(model, prompt, max_new_tokens=args.new_tokens))  # the library's loop
    columns = [("cache", 13), ("prefill tok/s", 13), ("decode tok/s", 12), ("cache MiB", 9), ("same as generate()", 18)]
    print("| " + " | ".join(f"{name:<{width}}" for name, width in columns) + " |")
    print("|" + "|".join("-" * (width + 2) for _, width in columns) + "|")
    rows = []
    for kind, quantized in kinds:
        prefill_and_decode(model, prompt, args.new_tokens, kind, quantized)  # compiles (the cache shape counts)
        tokens, prefill, decode = min(
            (prefill_and_decode(model, prompt, args.new_tokens, kind, quantized) for _ in range(args.repeats)),
            key=lambda r: r[1] + r[2],
        )
        name = kind + ("-int8" if quantized else "")
        row = dict(cache=name, prefill_tokens_per_s=prompt.size / prefill, decode_tokens_per_s=args.batch_size / decode,
                   cache_mib=cache_bytes(model, args, kind, quantized) / 2**20,
                   same_as_generate=float(np.mean(tokens == expected)))
        rows.append(row)
        print(f"| {name:<13} | {row['prefill_tokens_per_s']:>13,.0f} | {row['decode_tokens_per_s']:>12,.0f} | "
              f"{row['cache_mib']:>9.2f} | {row['same_as_generate']:>17.0%} |", flush=True)
    out_dir = args.out_dir / "generate"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out_dir / 'metrics.json'}")


if __name__ == "__main__":
    main()
