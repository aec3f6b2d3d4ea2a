"""Shared pieces of the benchmarks: timing, the float32 matmul peak, the HF twin of a model.

Every benchmark prints one JSON object per workload; the last line holds them all.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deltal_jax.models import Decoder, save_model


def median_seconds(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of fn() after `warmup` calls; fn's outputs are waited for."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(
    fns: dict[str, Callable[[], Any]], *, repeats: int = 5
) -> dict[str, float]:
    """Median wall time of each fn() over `repeats` rounds that call them in turn, after one
    untimed call each: a comparison whose sides are timed minutes apart on a shared host
    measures the host's drift as much as the code."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def seconds_and_peaks(
    fn: Callable[[], Any], *, repeats: int = 5
) -> tuple[list[float], list[float]]:
    """(wall time of each of `repeats` calls of fn(), the matmul peak in FLOP/s around each:
    the mean of the peaks measured just before and just after it), after one untimed
    warm-up call. On a shared host the rate drifts by ±15% within minutes, so a rate is
    best set against the peak of its own round, not against one taken once; bracketing
    the call halves the weight of a transient that hits one short peak measurement."""
    jax.block_until_ready(fn())
    times, peaks = [], [matmul_peak_flops(repeats=3)]
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        peaks.append(matmul_peak_flops(repeats=3))
    return times, [(a + b) / 2 for a, b in zip(peaks[:-1], peaks[1:], strict=True)]


def compile_seconds(jitted, *args) -> tuple[Any, float]:
    """(compiled executable, seconds spent tracing + compiling) for jitted(*args)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul rate (FLOP/s) of this process on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.dot)
    return 2 * n**3 / median_seconds(lambda: matmul(a, b), warmup=3, repeats=repeats)


def hf_twin(model: Decoder):
    """The transformers (PyTorch) model with exactly `model`'s weights, or None without
    torch/transformers installed."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as path:
        save_model(model, path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf.eval()


def emit(results: list[dict[str, Any]]) -> None:
    """Prints each workload's JSON object, then all of them on the last line."""
    for r in results:
        print(json.dumps(r), flush=True)
    print(json.dumps(results), flush=True)
