"""Gradient-variance diagnostics of the loss aggregators on a policy and task.

    python -m deltal_jax.analysis --policy=default --num_batches=64 \
        --reference_batches=192 --out=runs/variance

`--policy=default` is the policy the default run starts from (the warmed-up tiny model,
built once under `--cache_dir` by the trainer's own code); any HF-layout
checkpoint directory works too. Task, batch shape (B, G, M), temperature and advantage
estimator come from `--config` (default: `deltal_jax.config.base_config()`), e.g.
`--config=configs/countdown_tiny.py --config.rollout.group_size=16`.

Writes `<out>/variance.json` (every figure), `<out>/variance.md` (the tables, also
printed) and `<out>/variance.png`. See `deltal_jax/analysis/measure.py` for what each
figure is.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from deltal_jax import config as config_lib
from deltal_jax.analysis.variance import DEFAULT_AGGREGATORS, parse_aggregators

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config).")
_POLICY = flags.DEFINE_string("policy", "default", "'default' or an HF checkpoint directory.")
_CACHE = flags.DEFINE_string(
    "cache_dir", os.path.join("runs", "analysis_cache"), "Where --policy=default is built."
)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 64, "K: measured rollout batches.")
_REFERENCE = flags.DEFINE_integer("reference_batches", 192, "R: batches for the reference.")
_AGGREGATORS = flags.DEFINE_string(
    "aggregators", DEFAULT_AGGREGATORS, "grpo, dapo, dr_grpo, seq_sum, delta-l:α, comma-separated."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prompt draws and sampling keys.")
_CHUNK = flags.DEFINE_integer("chunk_rows", 8, "Rows per vmap of per-response gradients.")
_OUT = flags.DEFINE_string("out", os.path.join("runs", "variance"), "Output directory.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import matplotlib

    matplotlib.use("Agg")  # files only
    from deltal_jax.analysis import measure  # after flag parsing: keeps --help fast

    config = _CONFIG.value if _CONFIG.value is not None else config_lib.base_config()
    if _NUM_BATCHES.value < 3 or _REFERENCE.value < 2:
        raise app.UsageError(
            f"--num_batches={_NUM_BATCHES.value} must be at least 3 and --reference_batches="
            f"{_REFERENCE.value} at least 2 (variances and their jackknife errors)."
        )
    try:
        config_lib.validate(config)
        aggregators = parse_aggregators(_AGGREGATORS.value)
        model, tokenizer, policy_dir = measure.load_policy(_POLICY.value, config, _CACHE.value)
    except ValueError as e:  # also ConfigError; load_policy names what it accepts
        raise app.UsageError(str(e)) from None
    print(f"Policy: {os.path.abspath(policy_dir)}")
    result = measure.measure_policy(
        model, tokenizer, config, aggregators, num_batches=_NUM_BATCHES.value,
        reference_batches=_REFERENCE.value, seed=_SEED.value, chunk_rows=_CHUNK.value,
    )  # fmt: skip
    result["settings"]["policy"] = _POLICY.value
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "variance.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = measure.format_report(result)
    with open(os.path.join(_OUT.value, "variance.md"), "w") as f:
        f.write(table + "\n")
    measure.plot_report(result).savefig(os.path.join(_OUT.value, "variance.png"), dpi=120)
    print(table)
    print(f"Wrote {os.path.abspath(_OUT.value)}/variance.{{json,md,png}}")


if __name__ == "__main__":
    app.run(main)
