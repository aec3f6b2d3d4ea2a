"""`aggregation` workload (BENCHMARKS.md): the aggregation and loss functions alone on
[256, 8192] inputs, as a fraction of one `train` step of bench-medium measured in the
same process.

For each aggregator it times, jitted: the global coefficients from the lengths, the
clipped surrogate, the aggregate, and the gradient of that loss with respect to the
log-probs (what the backward pass adds on top of the model's own backward).

    python -m benchmarks.aggregation
    python -m benchmarks.aggregation --rows=256 --cols=8192 --repeats=20
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import train as train_benchmark
from benchmarks._common import compile_seconds, emit, median_seconds
from deltal_jax import aggregation, hostmem
from deltal_jax.policy_loss import clipped_surrogate

MODES = (
    aggregation.TOKEN_MEAN,
    aggregation.SEQ_MEAN_TOKEN_MEAN,
    aggregation.SEQ_MEAN_TOKEN_SUM_NORM,
    aggregation.DELTA_L,
)


def loss_and_grad(mode: str, max_response_len: int):
    """jit((logp, old_logp, advantages, mask) → (loss, ∂loss/∂logp))."""

    def loss(logp, old_logp, advantages, mask):
        coef = aggregation.response_coefficients(
            aggregation.response_lengths(mask), mode=mode, max_response_len=max_response_len,
            alpha=0.75,
        )  # fmt: skip
        per_token = clipped_surrogate(
            logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0
        ).loss
        return aggregation.aggregate(per_token, mask, coef)

    return jax.jit(jax.value_and_grad(loss))


def inputs(rows: int, cols: int) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(cols // 16, cols + 1, rows)
    mask = np.arange(cols)[None] < lengths[:, None]
    logp = np.log(rng.uniform(0.01, 1.0, (rows, cols))).astype(np.float32)
    old = (logp + rng.normal(0, 0.1, (rows, cols))).astype(np.float32)
    adv = rng.normal(size=rows).astype(np.float32)
    return tuple(jnp.asarray(x) for x in (logp, old, adv, mask))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    train = train_benchmark.run(
        "bench-medium",
        batch=32,
        prompt_len=32,
        response_len=128,
        repeats=5,
        hf=False,
        scan_layers=True,
    )
    train_seconds = train[aggregation.DELTA_L]["seconds"]
    data = inputs(args.rows, args.cols)
    result = {
        "workload": "aggregation",
        "shape": [args.rows, args.cols],
        "train_step_seconds_bench_medium": train_seconds,
    }
    for mode in MODES:
        compiled, compile_s = compile_seconds(loss_and_grad(mode, args.cols), *data)
        seconds = median_seconds(lambda c=compiled: c(*data), warmup=2, repeats=args.repeats)
        result[mode] = {
            "seconds": seconds,
            "compile_s": compile_s,
            "fraction_of_train_step": seconds / train_seconds,
        }
    emit([result])


if __name__ == "__main__":
    hostmem.use_huge_pages()
    main()
