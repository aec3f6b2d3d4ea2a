"""`rl_step` workload (BENCHMARKS.md): full steps of the real training loop, 4 prompts × 8
responses, 128 new tokens, the Countdown reward (cheap), no reference model, one update.

Figures: median seconds per step after the compiling first steps, and the share of
sampling, reward, reference, update and everything else (the loop's own overhead).

    python -m benchmarks.rl_step
    python -m benchmarks.rl_step --models=bench-small --steps=6
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from absl import logging

from benchmarks._common import emit
from deltal_jax import config as config_lib
from deltal_jax import hostmem, train

PHASES = ("sample", "reward", "reference", "update", "other")


def bench_config(model: str, steps: int):
    c = config_lib.base_config()
    c.model.preset = model
    c.total_steps = steps
    c.rollout.prompts_per_step, c.rollout.group_size = 4, 8
    c.rollout.max_prompt_len, c.rollout.max_response_len = 32, 128
    c.data.num_train, c.data.num_eval = 64, 8
    c.eval.every, c.eval.num_samples = 10**6, 1  # evaluation is not part of the workload
    c.checkpoint.every = 10**6
    c.logging.console = c.logging.tensorboard = c.logging.plot = False
    return c


def run(model: str, steps: int, warmup_steps: int) -> dict:
    timings = []

    def on_step(step, metrics):
        # The last step also writes the final checkpoint; leave it out with the warm-up.
        if warmup_steps < step < steps:
            timings.append(metrics)

    with tempfile.TemporaryDirectory() as workdir:
        train.train(bench_config(model, steps), workdir, on_step=on_step)
    step_s = statistics.median(m["time/step"] for m in timings)
    result = {"workload": "rl_step", "model": model, "steps_measured": len(timings)}
    result["seconds_per_step"] = step_s
    for phase in PHASES:
        result[f"share_{phase}"] = statistics.median(m[f"time/{phase}"] for m in timings) / step_s
    result["tokens_per_step"] = statistics.median(m["response_length/mean"] * 32 for m in timings)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bench-small,bench-medium")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    emit([run(m, args.steps, args.warmup_steps) for m in args.models.split(",")])


if __name__ == "__main__":
    hostmem.use_huge_pages()
    main()
