"""KL regularisation toward a frozen reference: estimators, placement, bias status.

Per token, with log r = clamp(ℓ_ref − ℓ, −20, 20) (ALGORITHMS.md §3, arXiv 2512.21852):

    k1 = −log r          k2 = ½ (log r)²          k3 = clamp(r − 1 − log r, −10, 10)

Placement decides which gradient the estimator produces:

- "reward": R_i ← R_i − β·sg(Σ_t m·k_t) before advantages (score-function gradient).
- "loss":   loss += β·agg(k_t), gradient through ℓ (pathwise gradient).
- "both":   both of the above with the same estimator and β.

Off-policy (PPO epochs > 1, a stale sampler) the loss-placed estimator can be weighted
by ρ = π_θ/π_old (`off_policy_correction=True`): E_old[ρ·k] = E_θ[k], so the per-token
estimate and its gradient are those of the current policy again; ρ·k3 is
DeepSeek-V3.2's "unbiased KL". The status of every configuration, for the
sequence-level reverse KL on-policy, is in `STATUS` and reported by `kl_status`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltal_jax.policy_loss import log_ratio

ESTIMATORS = ("k1", "k2", "k3")
PLACEMENTS = ("none", "reward", "loss", "both")
LOG_R_CLAMP = 20.0
K3_CLAMP = 10.0

# (estimator, placement, off_policy_correction) -> status, for the gradient of the
# sequence-level reverse KL(π_θ ‖ π_ref) when sampling on-policy.
STATUS = {
    ("k1", "reward", False): "unbiased (recommended default)",
    ("k2", "reward", False): "biased: E[k2] is not the KL value, so the score-function "
    "gradient is not that of the KL",
    ("k3", "reward", False): "biased: adds a forward-KL term; collapsed in the paper's runs",
    ("k1", "loss", False): "zero gradient in expectation (E[∇ log π] = 0): pure noise",
    ("k2", "loss", False): "biased: token-level reverse KL; misses credit from later tokens",
    ("k3", "loss", False): "biased: token-level forward KL (GRPO's default); stable but worse",
    ("k1", "loss", True): "biased: ρ·k1 gives the token-level reverse KL gradient; misses "
    "credit from later tokens",
    ("k2", "loss", True): "biased: ρ·k2 is not value-unbiased; token-level only",
    ("k3", "loss", True): "biased: token-level reverse KL; ρ·k3 (DeepSeek-V3.2's 'unbiased "
    "KL') is unbiased per token off-policy, not for the sequence KL",
    ("k1", "both", False): "unbiased (same estimator and β in reward and loss)",
    ("k2", "both", False): "biased: k2 is not value-unbiased",
    ("k3", "both", False): "unbiased (same estimator and β in reward and loss)",
    ("k1", "both", True): "biased: ρ's own gradient adds the token-level reverse KL to the "
    "unbiased 'both' gradient",
    ("k2", "both", True): "biased: k2 is not value-unbiased",
    ("k3", "both", True): "biased: ρ's own gradient adds the token-level reverse KL to the "
    "unbiased 'both' gradient",
}


def validate(estimator: str, placement: str, off_policy_correction: bool = False) -> None:
    """Raises a ValueError naming the field and the accepted values."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {estimator!r}. Accepted: {', '.join(ESTIMATORS)}.")
    if placement not in PLACEMENTS:
        raise ValueError(f"Unknown KL placement {placement!r}. Accepted: {', '.join(PLACEMENTS)}.")
    if off_policy_correction and placement == "reward":
        raise ValueError(
            "KL off_policy_correction applies to a loss-placed estimator; "
            "use placement 'loss' or 'both', or turn the correction off."
        )


def kl_status(estimator: str, placement: str, off_policy_correction: bool = False) -> str:
    """The bias status of a configuration, for logs and config docs."""
    validate(estimator, placement, off_policy_correction)
    if placement == "none":
        return "no KL regularisation"
    return STATUS[(estimator, placement, off_policy_correction)]


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """k_t for [N, T] log-probs ℓ (policy) and ℓ_ref (reference), with the peers' clamps."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {estimator!r}. Accepted: {', '.join(ESTIMATORS)}.")
    log_r = jnp.clip(ref_logp - logp, -LOG_R_CLAMP, LOG_R_CLAMP)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    return jnp.clip(jnp.expm1(log_r) - log_r, -K3_CLAMP, K3_CLAMP)


def reward_penalty(
    logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, estimator: str, beta: float
) -> jax.Array:
    """β·sg(Σ_t m[i,t]·k_t): [N] amount to subtract from the rewards ("reward" placement).

    `logp` are the log-probs the responses were scored with (the behaviour policy's).
    """
    k = kl_per_token(logp, ref_logp, estimator)
    per_row = jnp.sum(jnp.where(mask.astype(bool), k, 0.0), axis=-1)
    return jax.lax.stop_gradient(beta * per_row)


def loss_per_token(
    logp: jax.Array,
    ref_logp: jax.Array,
    *,
    estimator: str,
    beta: float,
    old_logp: jax.Array | None = None,
) -> jax.Array:
    """β·k_t, or β·ρ·k_t with ρ = exp(ℓ − sg(ℓ_old)) when `old_logp` is given: [N, T].

    The gradient flows through ℓ in k and in ρ. Aggregate it with the KL term's own mode.
    """
    k = kl_per_token(logp, jax.lax.stop_gradient(ref_logp), estimator)
    if old_logp is not None:
        k = jnp.exp(log_ratio(logp, old_logp)) * k
    return beta * k
