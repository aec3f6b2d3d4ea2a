"""A tiny sweep for tests and a first look: DAPO Norm vs ΔL (α = 0.5), 2 seeds, 2 steps each.

    python -m launch.sweep run configs/sweeps/smoke.py
    python -m launch.sweep summary runs/sweeps/smoke

Four trials (dapo-s0, dapo-s1, dl_a0.5-s0, dl_a0.5-s1) of the `smoke` preset of
configs/countdown_tiny.py, each a couple of minutes on two CPU cores; the numbers mean
nothing at this length, the point is the pipeline.
"""


def get_sweep():
    return {
        "config": "configs/countdown_tiny.py:smoke",
        "arms": {
            "dapo": {"loss.aggregation": "token-mean"},
            "dl_a0.5": {"loss.aggregation": "delta-l", "loss.alpha": 0.5},
        },
        "grid": {"seed": [0, 1]},
    }
