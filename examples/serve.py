"""A small continuous-batching generation engine over one paged KV cache, with a throughput report.

Requests (prompts of different lengths, each with its own ``max_new_tokens``) wait in a queue. The engine keeps
a running batch of ``--slots`` sequences over the per-layer ``PagedKVCache`` pools that ``model.init_cache(...,
kind="paged")`` builds, and every step is one call of one jitted function:

* every slot that is decoding appends its last token and gets its next one (``tokens [B, 1]`` with
  ``lengths[b] = 1``; empty slots and slots still reading their prompt pass ``lengths[b] = 0`` and their cache
  is left as it is);
* up to ``--prefill-rows`` slots that were given a request append the next chunk of its prompt (chunked
  prefill: ``[P, chunk]`` tokens, padded to the fixed chunk, ``lengths`` per row), run as a ``P``-row cache
  over the same page pools, so a chunk costs what its P rows cost however many slots decode; the token after
  a prompt's last chunk is the request's first new token.

The function has two programs (decoding only; decoding and prefilling), each compiled once whatever the
requests are. When a request ends (``--eos-id`` or its ``max_new_tokens``) its slot's pages go back to the pool
(``PagedKVCache.free``, inside the next step) and the next request in the queue takes the slot. A request is
admitted only when the pool has the pages its prompt and new tokens need, so the cache never overflows however
small ``--num-pages`` is.

The model is a small random ``TransformerLM`` (``--num-layers``, ``--features``, ``--num-heads``,
``--num-kv-heads``) or a Hugging Face checkpoint directory (``--checkpoint DIR``, a decoder-only language
model that ``attention_jax.models.auto`` loads; the prompts are random token ids either way). Greedy
decoding gives, for every request, the tokens ``aj.generate`` gives for that request alone; ``--compare``
runs the same requests through a loop of single-sequence ``aj.generate`` calls, checks that, and prints both
throughputs. Both are timed compiled (every shape ran once before), the fastest of ``--repeats`` runs each,
taken in turns so that both see the same machine load.

    python examples/serve.py                                  # 32 requests through 8 slots
    python examples/serve.py --compare                        # ... and the aj.generate loop, with the ratio
    python examples/serve.py --slots 4 --num-pages 48 --requests 16 --eos-id 7
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention_jax as aj
from attention_jax import nn as ajnn
from attention_jax.generate import sample_logits

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: ``prompt`` token ids, and at most ``max_new_tokens`` tokens to generate."""

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int


@dataclasses.dataclass
class _Slot:
    """A running request in one slot of the batch (host-side bookkeeping)."""

    request: Request
    pending: list[int]  # prompt tokens not yet fed to the model
    pages: int  # pages reserved for the request in each layer's pool
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far


@dataclasses.dataclass(frozen=True)
class Report:
    """What :meth:`Engine.run` measured."""

    requests: int
    tokens: int  # generated tokens, all requests
    seconds: float
    steps: int
    prefill_steps: int  # steps that also read prompt chunks
    mean_occupancy: float  # mean share of slots holding a request, over steps
    peak_pages: int  # most pages in use at once (in each layer's pool)
    pages_at_end: int  # pages still in use after the last request (0: every page was freed)
    num_pages: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def make_step(graphdef, *, temperature: float = 0.0):
    """The engine's step for models of ``graphdef``, jitted with the caches donated. The graph is closed over,
    not a static argument: hashing it at every call would cost as much as a small model's step."""
    return jax.jit(functools.partial(engine_step, graphdef, temperature=temperature), donate_argnames="caches")


def engine_step(graphdef, state, caches, tokens, lengths, release, rng, prefill=None, *, temperature=0.0):
    """One step of the running batch (see :func:`make_step`). Returns ``(next [B], caches, pages in use, rng)``.

    Frees the slots in ``release [B]``; appends ``tokens [B, 1]`` of the slots with ``lengths[b] == 1`` (decoding)
    and picks their next token; with ``prefill = (rows [P], chunk [P, C], chunk_lengths [P])`` also appends the
    first ``chunk_lengths[p]`` tokens of ``chunk[p]`` to slot ``rows[p]`` (``rows[p] == B``: an unused row), and
    picks the token after each chunk (the request's first new token once its prompt is read).
    """
    caches = tuple(cache.free(release) for cache in caches)
    model = nnx.merge(graphdef, state)
    rng, decode_rng, prefill_rng = jax.random.split(rng, 3)
    logits, caches = model(tokens, cache=caches, lengths=lengths)  # [B, 1, V]
    following = sample_logits(logits[:, 0], decode_rng, temperature=temperature)  # [B]
    if prefill is not None:
        # The prefilling slots alone, as a [P]-row cache over the same page pools: the [P, C] chunk costs what
        # P rows cost, whatever B is.
        rows, chunk, chunk_lengths = prefill
        sub = tuple(_rows(cache, rows) for cache in caches)
        last = jnp.maximum(chunk_lengths - 1, 0)[:, None]  # [P, 1]: each row's last real token
        logits, sub = model(chunk, cache=sub, lengths=chunk_lengths, logits_at=last)  # [P, 1, V]
        caches = tuple(_put_rows(cache, rows, part) for cache, part in zip(caches, sub))
        first = sample_logits(logits[:, 0], prefill_rng, temperature=temperature)  # [P]
        following = following.at[rows].set(first, mode="drop")
    in_use = caches[0].num_pages - caches[0].num_free_pages
    return following, caches, in_use, rng


def _rows(cache: aj.cache.PagedKVCache, rows: Array) -> aj.cache.PagedKVCache:
    """The sequences ``rows [P]`` of ``cache`` (an index past the batch reads the last one), sharing its pool."""
    safe = jnp.minimum(rows, cache.batch_size - 1)
    return dataclasses.replace(cache, page_table=cache.page_table[safe], lengths=cache.lengths[safe],
                               overflow=cache.overflow[safe])  # fmt: skip


def _put_rows(cache: aj.cache.PagedKVCache, rows: Array, part: aj.cache.PagedKVCache) -> aj.cache.PagedKVCache:
    """``cache`` with the sequences ``rows`` replaced by ``part``'s (indices past the batch dropped), and
    ``part``'s pool: its pages and free list."""
    put = lambda full, new: full.at[rows].set(new, mode="drop")
    return dataclasses.replace(
        part, page_table=put(cache.page_table, part.page_table), lengths=put(cache.lengths, part.lengths),
        overflow=put(cache.overflow, part.overflow),
    )  # fmt: skip


class Engine:
    """Continuous batching of :class:`Request` s over ``slots`` sequences of one paged cache per layer.

    Args:
      model: a language model called as ``model(tokens, cache=, lengths=, logits_at=)`` with
        ``init_cache(batch_size, max_length, kind="paged", page_size=, num_pages=)`` (a ``TransformerLM`` of
        attention layers).
      slots: B, the sequences decoded together.
      max_length: most tokens (prompt + new) one request may hold.
      page_size, num_pages: the pool of each layer (``num_pages`` default: enough for every slot at
        ``max_length``; a smaller pool makes requests wait for pages).
      chunk, prefill_rows: each step appends up to ``chunk`` prompt tokens to each of up to ``prefill_rows``
        slots that are reading their prompt (chunked prefill; the other slots decode meanwhile).
      eos_id: a request ends after emitting it (its last token).
      temperature: 0 is greedy; otherwise sampled with ``rng``.
    """

    def __init__(self, model, *, slots: int, max_length: int, page_size: int = 16, num_pages: int | None = None,
                 chunk: int = 32, prefill_rows: int = 2, eos_id: int | None = None, temperature: float = 0.0,
                 rng: Array | None = None):  # fmt: skip
        sizes = dict(slots=slots, max_length=max_length, page_size=page_size, chunk=chunk, prefill_rows=prefill_rows)
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
        frozen = nnx.merge(*nnx.split(model))  # eval mode, nothing recorded: as aj.generate runs a model
        frozen.eval()
        frozen.set_attributes(record_weights=False, raise_if_not_found=False)
        graphdef, self.state = nnx.split(frozen)
        self.step = make_step(graphdef, temperature=float(temperature))
        caches = model.init_cache(slots, max_length, kind="paged", page_size=page_size, num_pages=num_pages)
        if not all(isinstance(c, aj.cache.PagedKVCache) for c in caches):
            kinds = sorted({type(c).__name__ for c in caches})
            raise ValueError(f"the engine needs a paged cache in every layer, the model's init_cache gave {kinds}.")
        self.caches = jax.tree.map(jnp.copy, caches)  # own buffers: the step donates them
        self.slots, self.max_length, self.chunk, self.prefill_rows = slots, max_length, chunk, min(prefill_rows, slots)
        self.page_size, self.num_pages = page_size, caches[0].num_pages
        self.eos_id = eos_id
        self.rng = jax.random.key(0) if rng is None else rng

    def pages_for(self, request: Request) -> int:
        """Pages a request needs in each pool (prompt and new tokens)."""
        return -(-(len(request.prompt) + request.max_new_tokens) // self.page_size)

    def _step(self, tokens, lengths, release, prefill=None) -> tuple[np.ndarray, int]:
        following, self.caches, in_use, self.rng = self.step(
            self.state, self.caches, tokens, lengths, release, self.rng, prefill
        )
        return np.asarray(following), int(in_use)

    def _idle(self):
        """Arguments of a step where no slot feeds anything (it changes no cache)."""
        b, p = self.slots, self.prefill_rows
        prefill = (np.full(p, b, np.int32), np.zeros((p, self.chunk), np.int32), np.zeros(p, np.int32))
        return np.zeros((b, 1), np.int32), np.zeros(b, np.int32), np.zeros(b, bool), prefill

    def warm_up(self) -> float:
        """Compile the two step programs (decoding; decoding and prefilling); returns seconds."""
        start = time.perf_counter()
        tokens, lengths, release, prefill = self._idle()
        self._step(tokens, lengths, release)
        self._step(tokens, lengths, release, prefill)
        return time.perf_counter() - start

    def run(self, requests, progress=None) -> tuple[dict[int, list[int]], Report]:
        """Serve ``requests`` (first come, first served); returns ``({request id: new tokens}, report)``."""
        for r in requests:
            if not r.prompt or r.max_new_tokens < 1:
                raise ValueError(f"request {r.id} needs a prompt and max_new_tokens >= 1, got "
                                 f"{len(r.prompt)} prompt tokens and max_new_tokens={r.max_new_tokens}.")  # fmt: skip
            if len(r.prompt) + r.max_new_tokens > self.max_length or self.pages_for(r) > self.num_pages:
                raise ValueError(f"request {r.id} needs {len(r.prompt)} + {r.max_new_tokens} tokens, more than "
                                 f"max_length={self.max_length} or the pool's {self.num_pages} pages of "
                                 f"{self.page_size} tokens.")  # fmt: skip
        queue = collections.deque(requests)
        slots: list[_Slot | None] = [None] * self.slots
        release = np.zeros(self.slots, bool)  # slots whose request ended: free their pages in the next step
        done: dict[int, list[int]] = {}
        steps = prefill_steps = occupied = peak = in_use = 0
        start = time.perf_counter()
        while queue or any(slots):
            free_pages = self.num_pages - sum(s.pages for s in slots if s is not None)
            for b in range(self.slots):  # admit, in order, while a slot and the pages are free
                if slots[b] is None and queue and self.pages_for(queue[0]) <= free_pages:
                    r = queue.popleft()
                    slots[b] = _Slot(r, list(r.prompt), self.pages_for(r))
                    free_pages -= slots[b].pages
            tokens, lengths, _, (rows, chunk, chunk_lengths) = self._idle()  # [B, 1], [B]; [P], [P, C], [P]
            for b, s in enumerate(slots):
                if s is not None and not s.pending:  # decoding: feed the last token
                    tokens[b, 0], lengths[b] = s.tokens[-1], 1
            reading = [b for b, s in enumerate(slots) if s is not None and s.pending][: self.prefill_rows]
            for p, b in enumerate(reading):  # prefilling: feed the next chunk of the prompt
                feed = slots[b].pending[: self.chunk]
                del slots[b].pending[: len(feed)]
                rows[p], chunk[p, : len(feed)], chunk_lengths[p] = b, feed, len(feed)
            prefill = (rows, chunk, chunk_lengths) if reading else None
            following, in_use = self._step(tokens, lengths, release, prefill)
            release = np.zeros(self.slots, bool)  # a new array: the step may still read the last one
            steps, prefill_steps = steps + 1, prefill_steps + bool(reading)
            occupied, peak = occupied + sum(s is not None for s in slots), max(peak, in_use)
            for b, s in enumerate(slots):
                if s is None or s.pending:  # empty, or the prompt is not read yet: no token
                    continue
                s.tokens.append(int(following[b]))
                if len(s.tokens) == s.request.max_new_tokens or s.tokens[-1] == self.eos_id:
                    done[s.request.id] = s.tokens
                    slots[b], release[b] = None, True
                    if progress is not None:
                        progress(len(done), sum(map(len, done.values())))
        if release.any():  # the last requests' pages
            tokens, lengths, _, _ = self._idle()
            _, in_use = self._step(tokens, lengths, release)
        jax.block_until_ready(self.caches)
        seconds = time.perf_counter() - start
        for cache in self.caches:
            cache.check()
        report = Report(
            requests=len(done), tokens=sum(map(len, done.values())), seconds=seconds, steps=steps,
            prefill_steps=prefill_steps, mean_occupancy=occupied / max(steps * self.slots, 1), peak_pages=peak,
            pages_at_end=in_use, num_pages=self.num_pages,
        )  # fmt: skip
        return done, report


def generate_each(model, requests, *, eos_id: int | None) -> dict[int, list[int]]:
    """The baseline: one ``aj.generate`` call per request, cut after its first ``eos_id``."""
    out = {}
    for r in requests:
        tokens = np.asarray(aj.generate(model, jnp.asarray([r.prompt], jnp.int32), max_new_tokens=r.max_new_tokens,
                                        eos_id=eos_id))[0].tolist()  # fmt: skip
        stop = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
        out[r.id] = tokens[:stop]
    return out


def make_requests(n: int, vocab_size: int, prompt_range, new_range, seed: int) -> list[Request]:
    """``n`` requests with random prompts; lengths drawn uniformly from the inclusive ranges."""
    rng = np.random.default_rng(seed)
    return [
        Request(i, tuple(int(x) for x in rng.integers(0, vocab_size, int(rng.integers(*prompt_range, endpoint=True)))),
                int(rng.integers(*new_range, endpoint=True)))
        for i in range(n)
    ]  # fmt: skip


class Progress:
    """A plain-text progress bar on stderr (redrawn in place on a terminal, a line per 10% otherwise)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.start, self.shown = total, width, time.perf_counter(), -1
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, tokens: int) -> None:
        tenth = 10 * done // self.total
        if not self.tty and tenth == self.shown and done < self.total:
            return
        self.shown = tenth
        filled = self.width * done // self.total
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} requests, {tokens} tokens, " \
               f"{rate:,.0f} tok/s"  # fmt: skip
        print(("\r" if self.tty else "") + line, end="" if self.tty and done < self.total else "\n",
              file=sys.stderr, flush=True)  # fmt: skip


def build_model(args):
    if args.checkpoint is not None:
        from attention_jax.models import auto

        model = auto.from_pretrained(args.checkpoint)
        if not isinstance(model, ajnn.TransformerLM):
            raise SystemExit(f"{args.checkpoint} holds a {type(model).__name__}; the engine serves decoder-only LMs.")
        return model
    attention = functools.partial(ajnn.MultiHeadAttention, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                  rope=aj.positional.RoPE())  # fmt: skip
    return ajnn.TransformerLM(args.vocab_size, args.features, args.num_layers, attention=attention,
                              rngs=nnx.Rngs(args.seed))  # fmt: skip


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--prompt-lengths", type=parse_range, default=(8, 128), help="LO,HI prompt tokens")
    p.add_argument("--new-tokens", type=parse_range, default=(8, 64), help="LO,HI max_new_tokens per request")
    p.add_argument("--chunk", type=int, default=32, help="prompt tokens per prefilling slot and step")
    p.add_argument("--prefill-rows", type=int, default=2, help="slots that read a prompt chunk in one step")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="pages per layer (default: every slot at full length)")
    p.add_argument("--eos-id", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--compare", action="store_true", help="also a loop of single-sequence aj.generate calls")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the fastest counts)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, default=None, help="a Hugging Face checkpoint directory instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("outputs"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.compare and args.temperature > 0:
        raise SystemExit("--compare checks the engine's tokens against aj.generate: it needs greedy decoding.")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}.")

    model = build_model(args)
    requests = make_requests(args.requests, model.vocab_size, args.prompt_lengths, args.new_tokens, args.seed)
    max_length = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engine = Engine(model, slots=args.slots, max_length=max_length, page_size=args.page_size,
                    num_pages=args.num_pages, chunk=args.chunk, prefill_rows=args.prefill_rows, eos_id=args.eos_id,
                    temperature=args.temperature, rng=jax.random.key(args.seed))  # fmt: skip
    print(f"{args.requests} requests (prompts {args.prompt_lengths[0]}-{args.prompt_lengths[1]} tokens, "
          f"{args.new_tokens[0]}-{args.new_tokens[1]} new) through {args.slots} slots; pools of {engine.num_pages} "
          f"pages of {args.page_size} tokens per layer; prefill {engine.prefill_rows} x {args.chunk} tokens per "
          f"step; backend {jax.default_backend()}")  # fmt: skip
    compile_s = engine.warm_up()
    outputs, report = engine.run(requests, progress=None if args.quiet else Progress(len(requests)))
    if args.compare:  # the baseline's compilation: one program per (prompt length, max_new_tokens)
        start = time.perf_counter()
        shapes = list({(len(r.prompt), r.max_new_tokens): r for r in requests}.values())
        generate_each(model, shapes, eos_id=args.eos_id)
        generate_compile_s, generate_s = time.perf_counter() - start, float("inf")
    for _ in range(args.repeats):  # in turns: both see the same load
        again, timed = engine.run(requests)
        if again != outputs and args.temperature == 0:
            raise RuntimeError("a greedy rerun of the same requests gave other tokens")
        report = min(report, timed, key=lambda r: r.seconds)
        if args.compare:
            start = time.perf_counter()
            expected = generate_each(model, requests, eos_id=args.eos_id)
            generate_s = min(generate_s, time.perf_counter() - start)
    print(f"engine:   {report.requests} requests, {report.tokens} tokens in {report.seconds:.2f} s = "
          f"{report.tokens_per_s:,.1f} tokens/s (compiled in {compile_s:.1f} s); {report.steps} steps "
          f"({report.prefill_steps} with prompt chunks), mean batch occupancy {report.mean_occupancy:.0%}, "
          f"pages in use: peak {report.peak_pages}/{report.num_pages}, {report.pages_at_end} at the end")  # fmt: skip
    metrics = dict(dataclasses.asdict(report), tokens_per_s=report.tokens_per_s, compile_s=compile_s)
    if args.compare:
        tokens = sum(map(len, expected.values()))  # the same count: a request stops at its eos in both
        generate_tps = tokens / generate_s
        same = sum(outputs[r.id] == expected[r.id] for r in requests)
        print(f"generate: {len(requests)} requests, {tokens} tokens in {generate_s:.2f} s = {generate_tps:,.1f} "
              f"tokens/s (compiled {len(shapes)} shapes in {generate_compile_s:.1f} s)")  # fmt: skip
        print(f"engine / generate loop: {report.tokens_per_s / generate_tps:.2f}x tokens/s; "
              f"same tokens as aj.generate for {same}/{len(requests)} requests")  # fmt: skip
        metrics.update(generate_tokens_per_s=generate_tps, generate_compile_s=generate_compile_s,
                       ratio=report.tokens_per_s / generate_tps, same_as_generate=same / len(requests))  # fmt: skip
    out_dir = args.out_dir / "serve"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
