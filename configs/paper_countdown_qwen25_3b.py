"""ΔL paper recipe: Qwen2.5-3B base on Countdown, ΔL with α = 1 (arXiv 2509.07558).

    deltal-train --config=configs/paper_countdown_qwen25_3b.py \
        --config.model.hf_dir=/ckpt/Qwen2.5-3B --workdir=runs/countdown-3b-dl1

Hyperparameters from the reference scripts (ALGORITHMS.md §7; `deltal_jax.config.
paper_recipe`): no chat template; 128 prompts per step × G = 10 responses; PPO
mini-batches of 32 prompts (4 optimiser steps per rollout); AdamW lr 1e-6 constant,
weight decay 0.01, gradient clip 1.0; ε_low / ε_high = 0.2 / 0.3; no KL, no entropy bonus;
M = 8192 (the paper's grid also has 3072: `--config.rollout.max_response_len=3072`);
validation 8 samples at temperature 1.0 (Avg@8, Pass@8). Countdown with 3–4 numbers
(TinyZero-style): reward 1 for a correct equation using each number exactly once.

Presets: `:grpo`, `:dapo`, `:dr_grpo` swap the aggregator for the paper's baselines;
`:dapo_recipe` is ΔL inside DAPO (G = 8, M = 3072, dynamic sampling, dual clip c = 10).
Reported (secondary source, unconfirmed): Avg@8 0.847 for ΔL vs 0.811 for GRPO Norm at
M = 3072.
"""

from deltal_jax.config import apply_paper_preset, paper_recipe


def get_config(arg: str | None = None):
    c = paper_recipe()
    c.model.preset = "qwen2.5-3b"
    c.data.task = "countdown"
    c.data.num_numbers = (3, 4)
    c.data.max_number = 99
    c.data.max_target = 100
    c.data.test_fraction = 0.05
    c.data.num_train = 50000
    c.data.num_eval = 512
    c.loss.alpha = 1.0
    return apply_paper_preset(c, arg, {"dapo_recipe": _delta_l_in_dapo})


def _delta_l_in_dapo(c) -> None:
    """ΔL inside DAPO: G = 8, M = 3072, dynamic sampling, dual clip c = 10."""
    c.rollout.group_size = 8
    c.rollout.max_response_len = 3072
    c.rollout.dynamic_sampling = True
    c.loss.clip_ratio_c = 10.0
