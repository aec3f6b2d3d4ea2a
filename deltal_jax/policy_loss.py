"""Per-token policy-gradient losses: PPO clipped surrogate, dual clip, GSPO, entropy.

Each function returns per-token losses (to minimise) of shape [N, T]; the aggregators of
`deltal_jax.aggregation` turn them into a scalar. With ℓ the log-probs under the policy
being trained and ℓ_old under the behaviour policy (ALGORITHMS.md §0, §4, §5):

    ρ[i,t]  = exp(clamp(ℓ − sg(ℓ_old), −20, 20))
    s[i,t]  = min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â)
    loss    = −s, and for Â < 0 additionally capped at −c·Â (dual clip, c > 1)

Advantages and any length-derived weight are constants with respect to θ.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deltal_jax.aggregation import masked_row_mean

LOG_RATIO_CLAMP = 20.0

VARIANTS = ("ppo", "gspo", "gspo-token")


class PolicyLossOutput(NamedTuple):
    """Per-token loss and the indicators researchers log (all [N, T])."""

    loss: jax.Array  # −s, the quantity to aggregate and minimise
    ratio: jax.Array  # ρ (token ratio, or the sequence ratio s_i broadcast for GSPO)
    clipped_low: jax.Array  # Â < 0 and ρ < 1 − ε_low: the clip removed the gradient
    clipped_high: jax.Array  # Â > 0 and ρ > 1 + ε_high: the clip removed the gradient
    dual_clipped: jax.Array  # Â < 0 and the −c·Â cap is active


def log_ratio(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
    """clamp(ℓ − sg(ℓ_old), −20, 20): the clamp keeps exp() finite on stale samples."""
    diff = logp - jax.lax.stop_gradient(old_logp)
    return jnp.clip(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def gspo_log_ratio(
    logp: jax.Array, old_logp: jax.Array, mask: jax.Array, *, token_level: bool
) -> jax.Array:
    """GSPO sequence log-ratio (arXiv 2507.18071), broadcast to [N, T].

    log s_i = (1/L_i) Σ_t m[i,t] (ℓ − sg(ℓ_old)). GSPO uses it as is, so every token's
    gradient is (1/L_i)·∇ℓ scaled by the sequence term. GSPO-token uses
    sg(log s_i) + ℓ − sg(ℓ): the same value, with each token's own gradient, so token-level
    advantages can be used; for a per-sequence Â both give the same gradient.
    """
    seq = masked_row_mean(logp - jax.lax.stop_gradient(old_logp), mask)
    seq = jnp.broadcast_to(jnp.clip(seq, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[:, None], logp.shape)
    if not token_level:
        return seq
    return jax.lax.stop_gradient(seq) + logp - jax.lax.stop_gradient(logp)


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float | None = None,
    variant: str = "ppo",
) -> PolicyLossOutput:
    """Clipped policy-gradient surrogate per token.

    Args:
      logp: [N, T] ℓ under the policy being trained (carries the gradient).
      old_logp: [N, T] ℓ_old under the behaviour policy (stop-gradient is applied).
      advantages: [N] per-response Â_i or [N, T] per-token Â[i,t].
      mask: [N, T] response mask m (used by GSPO's per-sequence mean).
      eps_low, eps_high: clip range [1 − ε_low, 1 + ε_high] (DAPO clip-higher when
        ε_high > ε_low; GSPO uses 3e-4 / 4e-4).
      clip_ratio_c: dual-clip constant c > 1 (3.0 typical; 10.0 in the ΔL DAPO recipes);
        None disables the dual clip.
      variant: "ppo" (token ratio), "gspo" or "gspo-token" (sequence ratio).

    Returns:
      PolicyLossOutput with per-token loss −s[i,t] and clip indicators.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown policy-loss variant {variant!r}. Accepted: {VARIANTS}.")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got eps_low={eps_low}, eps_high={eps_high}.")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to disable), got {clip_ratio_c}.")
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {logp.shape}, old_logp {old_logp.shape} and mask {mask.shape} must match."
        )
    if advantages.ndim == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(
                f"advantages {advantages.shape} must be [N] or [N, T], N={logp.shape[0]}."
            )
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages {advantages.shape} must be [N] or {logp.shape}.")
    adv = jax.lax.stop_gradient(advantages.astype(logp.dtype))

    if variant == "ppo":
        log_rho = log_ratio(logp, old_logp)
    else:
        log_rho = gspo_log_ratio(logp, old_logp, mask, token_level=variant == "gspo-token")
    # Padding tokens get ratio 1: garbage there (even NaN log-probs) must not reach the
    # gradient, where a later mask could not remove it (0 · NaN = NaN).
    ratio = jnp.exp(jnp.where(mask.astype(bool), log_rho, 0.0))

    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    dual_clipped = jnp.zeros(loss.shape, bool)
    if clip_ratio_c is not None:
        cap = -adv * clip_ratio_c
        dual_clipped = (adv < 0) & (loss > cap)
        loss = jnp.where(adv < 0, jnp.minimum(loss, cap), loss)

    adv_b = jnp.broadcast_to(adv, loss.shape)
    return PolicyLossOutput(
        loss=loss,
        ratio=jax.lax.stop_gradient(ratio),
        clipped_low=(adv_b < 0) & (ratio < 1.0 - eps_low),
        clipped_high=(adv_b > 0) & (ratio > 1.0 + eps_high),
        dual_clipped=dual_clipped,
    )


def entropy_bonus(entropy: jax.Array, coefficient: float) -> jax.Array:
    """Per-token loss −coef·H[i,t]: minimising it raises the policy's entropy.

    Aggregate it with its own mode (usually token-mean), not the policy-gradient one.
    """
    return -coefficient * entropy
