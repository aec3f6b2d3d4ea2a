"""Verifiable rewards: safe, time-bounded verifiers and batch scoring.

`score_batch(responses, metas, "countdown" | "math" | "format", timeout_s=…, pool=…)`
is the entry point for the trainer; `REWARD_FNS` lists the verifiers by name.
"""

from deltal_jax.rewards.countdown import countdown_reward, evaluate_expression
from deltal_jax.rewards.format import format_reward
from deltal_jax.rewards.math import math_reward
from deltal_jax.rewards.result import RewardResult
from deltal_jax.rewards.scoring import (
    REWARD_FNS,
    RewardPool,
    ScoredBatch,
    count_reasons,
    get_reward_fn,
    score_batch,
)

__all__ = [
    "REWARD_FNS",
    "RewardPool",
    "RewardResult",
    "ScoredBatch",
    "count_reasons",
    "countdown_reward",
    "evaluate_expression",
    "format_reward",
    "get_reward_fn",
    "math_reward",
    "score_batch",
]
