"""ΔL paper recipe: Qwen2.5-7B base on math, ΔL with α = 0.75 (arXiv 2509.07558 §5).

    deltal-train --config=configs/paper_math_qwen25_7b.py \
        --config.model.hf_dir=/ckpt/Qwen2.5-7B \
        --config.data.jsonl_train=/data/orz_math_57k.jsonl \
        --config.data.jsonl_test=/data/math500.jsonl --workdir=runs/math-7b-dl075

Hyperparameters as the Countdown recipe (ALGORITHMS.md §7, `paper_recipe`): no chat
template; 128 prompts × G = 10; PPO mini-batches of 32 prompts; AdamW lr 1e-6 constant,
weight decay 0.01, clip 1.0; ε 0.2 / 0.3; no KL, no entropy; M = 8192; validation 8
samples at temperature 1.0. Training data: the Open-Reasoner-Zero set as JSONL lines
`{"question", "answer"}`; evaluation on MATH500 (also AIME 2024, AMC, Minerva in the
paper). Answers are compared on the last `\\boxed{}` by normalised string, then
symbolically (sympy, time-bounded).

Presets: `:grpo`, `:dapo`, `:dr_grpo` swap the aggregator for the paper's baselines.
"""

from deltal_jax.config import apply_paper_preset, paper_recipe


def get_config(arg: str | None = None):
    c = paper_recipe()
    c.model.preset = "qwen2.5-7b"
    c.data.task = "math"
    c.data.jsonl_train = "data/orz_math_57k.jsonl"  # override with your local copy
    c.data.jsonl_test = "data/math500.jsonl"
    c.data.num_eval = 500
    c.rollout.max_prompt_len = 512
    c.loss.alpha = 0.75
    return apply_paper_preset(c, arg)
