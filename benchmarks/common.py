"""Shared helpers of the benchmark scripts: timing, peak memory, the machine, and RESULTS.md sections.

* :func:`time_fn` warms up (compiles) once, then returns the median (and all samples) of ``repeats`` timed calls,
  blocking on the result so that asynchronous dispatch is not mistaken for speed.
* :func:`run_child` runs a measurement in a fresh Python process (clean peak memory, no cross-talk
  between peers, an out-of-memory peer cannot take the suite down) and returns its JSON answer.
* :func:`machine` describes the machine in one line; :func:`load_average` tells how busy it is.
* :func:`markdown_table` and :func:`write_section` write a named section of ``benchmarks/RESULTS.md``
  between ``<!-- begin: NAME -->`` / ``<!-- end: NAME -->`` markers, leaving the other sections alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


# ---------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------


def block(x: Any) -> Any:
    """Wait for every array in ``x`` (JAX arrays; torch tensors and floats pass through)."""
    try:
        import jax

        return jax.block_until_ready(x)
    except ImportError:  # pragma: no cover - jax is a dependency
        return x


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` untimed ones.

    Returns ``{"median", "min", "samples", "first"}``; ``first`` is the first warm-up call (compilation
    included), or None without warm-up. With ``repeats=0`` the median is the first call's time.
    """
    first = None
    for n in range(warmup):
        start = time.perf_counter()
        block(fn())
        if n == 0:
            first = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        samples.append(time.perf_counter() - start)
    summary = samples or [first]
    return {"median": statistics.median(summary), "min": min(summary), "samples": samples, "first": first}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, args: Sequence[str], timeout: float = 1800) -> dict:
    """Run ``python script *args`` in a fresh process; it must print one JSON object on its last line.

    Returns that object, or ``{"error": ...}`` when the child fails (out of memory, timeout, exception).
    """
    cmd = [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0][:200]
        return {"error": f"exit {proc.returncode}: {reason}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux
        return float("nan")


def machine() -> str:
    """One line: CPU, cores, memory, OS, Python and library versions."""
    import jax

    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    mem = memory_gb()
    if mem:
        parts.append(f"{mem:.0f} GB RAM")
    parts.append(f"{platform.system()} {platform.machine()}, Python {platform.python_version()}")
    parts.append(f"jax {jax.__version__} ({jax.default_backend()})")
    torch = torch_version()
    if torch:
        parts.append(f"torch {torch}")
    return ", ".join(parts)


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A GitHub table; ``align`` has one character per column, ``l`` or ``r`` (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace the section ``title`` of ``path`` (between its markers) with ``body``; keep every other section."""
    begin, end = f"<!-- begin: {title} -->", f"<!-- end: {title} -->"
    block_text = "\n".join([begin, f"## {title}", "", body.strip("\n"), end])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block_text + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block_text + "\n"
    path.write_text(text)
