"""Toy-scale reproduction of the ΔL paper's aggregator comparison on tiny Countdown.

    python -m launch.sweep run configs/sweeps/paper_toy.py --parallel=2
    python -m launch.sweep summary runs/sweeps/paper_toy

GRPO Norm, DAPO Norm, Dr. GRPO Norm and ΔL with α ∈ {0.5, 0.75, 1} (the paper's
comparison, ALGORITHMS.md §7), each at two maximum response lengths M and with three
seeds: 6 arms × 2 M × 3 seeds = 36 trials named like `dl_a0.75-M24-s1`. Everything else
comes from the `toy` preset of configs/countdown_tiny.py. The summary reports final
held-out Avg@k and Pass@k, best Avg@k, the monotonicity (Kendall's τ_b of Avg@k against
step) and largest drop of each curve, as mean ± std over the seeds, and plots final Avg@k
against α per M and the eval curves per arm. Results: docs/toy_reproduction/.
"""


def get_sweep():
    return {
        "config": "configs/countdown_tiny.py:toy",
        "arms": {
            "grpo": {"loss.aggregation": "seq-mean-token-mean"},
            "dapo": {"loss.aggregation": "token-mean"},
            "dr_grpo": {"loss.aggregation": "seq-mean-token-sum-norm"},
            "dl_a0.5": {"loss.aggregation": "delta-l", "loss.alpha": 0.5},
            "dl_a0.75": {"loss.aggregation": "delta-l", "loss.alpha": 0.75},
            "dl_a1.0": {"loss.aggregation": "delta-l", "loss.alpha": 1.0},
        },
        "grid": {"rollout.max_response_len": [24, 32], "seed": [0, 1, 2]},
    }
