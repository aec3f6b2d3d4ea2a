"""The default CPU run: a tiny character-level model on 3-number Countdown.

    deltal-train --config=configs/countdown_tiny.py --workdir=runs/tiny

A fresh model is warmed up with supervised steps on generated solutions (a few minutes on
two CPU cores), then trained with GRPO advantages and ΔL (α = 1) aggregation. Held-out
Avg@4 over 200 prompts is logged every 20 steps; the run writes curves.png at the end.

Presets (`--config=configs/countdown_tiny.py:PRESET`):
  default   the run above
  smoke     a few steps with a shorter warm-up, for tests and a quick look
  toy       the trials of the toy reproduction of the ΔL paper's comparison
            (configs/sweeps/paper_toy.py): 60 RL steps of 8 prompts × 8 responses
            from one shared warm-up (cached in runs/warmup_cache), held-out Avg@2
            over 128 prompts every 15 steps
"""

from deltal_jax.config import base_config


def get_config(arg: str | None = None):
    config = base_config()
    if arg in (None, "", "default"):
        return config
    if arg == "smoke":
        config.total_steps = 2
        config.warmup.steps = 5
        config.data.num_train = 256
        config.data.num_eval = 16
        config.rollout.prompts_per_step = 4
        config.rollout.group_size = 4
        config.eval.every = 2
        config.eval.num_samples = 2
        config.checkpoint.every = 1
        config.logging.plot = False
        return config
    if arg == "toy":
        config.total_steps = 60
        config.warmup.cache_dir = "runs/warmup_cache"
        config.rollout.prompts_per_step = 8
        config.data.num_eval = 128
        config.eval.every = 15
        config.eval.num_samples = 2
        config.checkpoint.every = 15
        config.logging.plot = False
        return config
    raise ValueError(f"Unknown preset {arg!r} for countdown_tiny; accepted: default, smoke, toy.")
