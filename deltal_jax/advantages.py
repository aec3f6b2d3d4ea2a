"""Advantage estimators for outcome rewards, and the DAPO reward/advantage shaping.

Rewards arrive as a flat [N] vector of N = B·G responses laid out group by group: rows
g·G … g·G + G − 1 are the G responses to prompt g (ALGORITHMS.md §2, §4). Estimators that
need batch-wide statistics take `axis_name` so they also run on a data-parallel shard
under `pmap`/`shard_map` (each device holds whole groups).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import betaln, xlog1py, xlogy

from deltal_jax.aggregation import masked_row_mean

ESTIMATORS = (
    "grpo",
    "mean_only",
    "rloo",
    "reinforce_pp_baseline",
    "bnpo",
    "stratified",
    "spo",
)


def _groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """[N] -> [N/G, G], with a clear error when rows do not form whole groups."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape [N], got {rewards.shape}.")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size must be a positive divisor of the number of responses "
            f"{rewards.shape[0]}, got {group_size}."
        )
    return rewards.astype(jnp.float32).reshape(-1, group_size)


def _batch_mean_std(
    x: jax.Array, axis_name: str | None, ddof: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Mean and std of every element of x, across devices under `axis_name`."""
    n = jnp.asarray(x.size, jnp.float32)
    total, sq = jnp.sum(x), jnp.sum(x * x)
    if axis_name is not None:
        n, total, sq = jax.lax.psum((n, total, sq), axis_name)
    mean = total / n
    var = jnp.maximum(sq / n - mean * mean, 0.0) * n / jnp.maximum(n - ddof, 1.0)
    return mean, jnp.sqrt(var)


def grpo(rewards: jax.Array, group_size: int, *, eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """A_i = (R_i − mean_g R) / (std_g R + ε).

    The references use the unbiased std (ddof = 1; note `jnp.std` defaults to ddof = 0)
    and ε = 1e-6 (TRL uses 1e-4). A singleton group (G = 1) has mean 0 and std 1, so
    A = R, as in verl.
    """
    r = _groups(rewards, group_size)
    if group_size == 1:
        return r.reshape(-1)
    mean = r.mean(-1, keepdims=True)
    std = jnp.std(r, axis=-1, keepdims=True, ddof=ddof)
    return ((r - mean) / (std + eps)).reshape(-1)


def mean_only(rewards: jax.Array, group_size: int) -> jax.Array:
    """Dr. GRPO: A_i = R_i − mean_g R (no std division)."""
    r = _groups(rewards, group_size)
    return (r - r.mean(-1, keepdims=True)).reshape(-1)


def rloo(rewards: jax.Array, group_size: int) -> jax.Array:
    """Leave-one-out baseline: A_i = R_i − mean_{j≠i} R_j = G/(G−1)·(R_i − mean_g R)."""
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out mean), got {group_size}.")
    r = _groups(rewards, group_size)
    loo_mean = (r.sum(-1, keepdims=True) - r) / (group_size - 1)
    return (r - loo_mean).reshape(-1)


def reinforce_pp_baseline(
    rewards: jax.Array, group_size: int, *, eps: float = 1e-6, axis_name: str | None = None
) -> jax.Array:
    """REINFORCE++ with a group baseline: R_i − mean_g R, then whitened over the batch."""
    a = mean_only(rewards, group_size)
    mean, std = _batch_mean_std(a, axis_name)
    return (a - mean) / (std + eps)


class BetaParams(NamedTuple):
    alpha: jax.Array
    beta: jax.Array


def bnpo_beta_params(group_success: jax.Array, *, axis_name: str | None = None) -> BetaParams:
    """BNPO's Beta(α, β) from a method-of-moments fit to the batch's success rates p̂.

    m, v = mean and unbiased variance of p̂ over groups; Beta(a, b) with
    a = (m(1−m)/v − 1)·m, b = (m(1−m)/v − 1)·(1−m); then α = max(1 + a/3, 1),
    β = max(1 + b/3, 1). With v = 0 the fit is undefined and we use α = β = 1
    (REINFORCE with a group baseline), the limit the max(·, 1) floor gives when
    m(1−m)/v < 1.
    """
    m, std = _batch_mean_std(group_success, axis_name, ddof=1)
    v = std * std
    k = jnp.where(v > 0, m * (1.0 - m) / jnp.where(v > 0, v, 1.0) - 1.0, 0.0)
    a, b = k * m, k * (1.0 - m)
    return BetaParams(jnp.maximum(1.0 + a / 3.0, 1.0), jnp.maximum(1.0 + b / 3.0, 1.0))


def beta_log_pdf(p: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """log f_Beta(p; α, β), with 0·log 0 = 0 so it is finite at p ∈ {0, 1} when α or β = 1."""
    return xlogy(alpha - 1.0, p) + xlog1py(beta - 1.0, -p) - betaln(alpha, beta)


def bnpo(
    rewards: jax.Array,
    group_size: int,
    *,
    params: BetaParams | None = None,
    max_inverse_density: float = 1e6,
    axis_name: str | None = None,
) -> jax.Array:
    """BNPO (arXiv 2506.02864): A = (R − p̂) / f_Beta(p̂; α, β) for binary rewards.

    rewards: [N] binary rewards, or [N, K] for K binary reward components (one advantage
    per component, averaged). p̂ is the group success rate; (α, β) come from
    `bnpo_beta_params` unless given. 1/f is clamped to [0, max_inverse_density]; rows
    with p̂ ∈ {0, 1} have R − p̂ = 0 and stay 0 whatever the clamp.
    """
    if rewards.ndim == 2:
        per_component = [
            bnpo(rewards[:, k], group_size, params=params, axis_name=axis_name)
            for k in range(rewards.shape[1])
        ]
        return jnp.mean(jnp.stack(per_component), axis=0)
    r = _groups(rewards, group_size)
    p_hat = r.mean(-1, keepdims=True)  # [n_groups, 1]
    if params is None:
        params = bnpo_beta_params(p_hat[:, 0], axis_name=axis_name)
    inv_density = jnp.clip(
        jnp.exp(-beta_log_pdf(p_hat, params.alpha, params.beta)), 0.0, max_inverse_density
    )
    return ((r - p_hat) * inv_density).reshape(-1)


def stratified(
    rewards: jax.Array,
    group_size: int,
    strata: jax.Array,
    *,
    blend: float = 1.0,
    eps: float = 1e-6,
    ddof: int = 1,
) -> jax.Array:
    """Stratified advantage normalisation (SAN, arXiv 2510.06214).

    Within each prompt's group, responses sharing a structural key (`strata`, [N] ints,
    e.g. the number of tool calls) form a stratum, normalised on its own:
    A_SAN = (R − mean_s R)/(std_s R + ε), 0 for a singleton stratum. The returned
    advantage is λ·A_SAN + (1 − λ)·A_GRPO with λ = `blend`. One stratum gives GRPO.
    """
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"stratified blend λ must be in [0, 1], got {blend}.")
    if strata.shape != rewards.shape:
        raise ValueError(f"strata {strata.shape} must match rewards {rewards.shape}.")
    r = _groups(rewards, group_size)  # [n_groups, G]
    key = strata.reshape(r.shape)
    same = (key[:, :, None] == key[:, None, :]).astype(jnp.float32)  # [n_groups, G, G]
    n = same.sum(-1)  # stratum size of each row
    mean = jnp.einsum("gij,gj->gi", same, r) / n
    sq_dev = jnp.einsum("gij,gij->gi", same, (r[:, None, :] - mean[:, :, None]) ** 2)
    std = jnp.sqrt(sq_dev / jnp.maximum(n - ddof, 1.0))
    san = jnp.where(n > 1, (r - mean) / (std + eps), 0.0).reshape(-1)
    if blend == 1.0:
        return san
    return blend * san + (1.0 - blend) * grpo(rewards, group_size, eps=eps, ddof=ddof)


# ----------------------------------------------------------------------------------------
# SPO: a persistent per-prompt Beta tracker (Single-stream PO, arXiv 2509.13232).
# ----------------------------------------------------------------------------------------


class SPOState(NamedTuple):
    """Per-prompt Beta(α_x, β_x) success tracker; a pytree, checkpointed with the run."""

    alpha: jax.Array  # [num_prompts]
    beta: jax.Array  # [num_prompts]


def spo_init(num_prompts: int, *, alpha0: float = 0.5, beta0: float = 0.5) -> SPOState:
    """A fresh tracker: every prompt starts at Beta(α0, β0) (baseline α0/(α0+β0))."""
    return SPOState(
        jnp.full((num_prompts,), alpha0, jnp.float32), jnp.full((num_prompts,), beta0, jnp.float32)
    )


def spo_baseline(state: SPOState, prompt_ids: jax.Array) -> jax.Array:
    """p̂_x = α_x / (α_x + β_x), read before the tracker is updated with this step."""
    a, b = state.alpha[prompt_ids], state.beta[prompt_ids]
    return a / (a + b)


def spo_advantages(
    rewards: jax.Array,
    baseline: jax.Array,
    *,
    eps: float = 1e-6,
    axis_name: str | None = None,
) -> jax.Array:
    """A = R − p̂, then normalised over the whole batch (zero mean, unit std)."""
    a = rewards.astype(jnp.float32) - baseline
    mean, std = _batch_mean_std(a, axis_name)
    return (a - mean) / (std + eps)


def spo_discount(
    stored_logp: jax.Array | None = None,
    current_logp: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    half_life: float = 0.06,
    rho_min: float = 0.875,
    rho_max: float = 0.96,
) -> jax.Array:
    """Tracker discount ρ = clip(2^(−D/half_life), ρ_min, ρ_max) per prompt.

    D = mean_t |ℓ_now − ℓ_stored| over the prompt's last response ([n, T] log-probs and
    mask): the more the policy moved since that response was scored, the faster old
    evidence is forgotten. With no log-probs it returns the constant ρ_min (the simple
    variant).
    """
    if stored_logp is None:
        return jnp.asarray(rho_min, jnp.float32)
    d = masked_row_mean(jnp.abs(current_logp - stored_logp), mask)
    return jnp.clip(2.0 ** (-d / half_life), rho_min, rho_max)


def spo_update(
    state: SPOState, prompt_ids: jax.Array, rewards: jax.Array, rho: jax.Array
) -> SPOState:
    """α ← ρα + R, β ← ρβ + (1 − R) for each prompt seen this step ([n] ids, rewards, ρ)."""
    rho = jnp.broadcast_to(rho, prompt_ids.shape)
    r = rewards.astype(jnp.float32)
    alpha = state.alpha.at[prompt_ids].set(rho * state.alpha[prompt_ids] + r)
    beta = state.beta.at[prompt_ids].set(rho * state.beta[prompt_ids] + (1.0 - r))
    return SPOState(alpha, beta)


def spo_sampling_probs(state: SPOState, *, floor: float = 0.05) -> jax.Array:
    """Prompt sampling distribution ∝ sqrt(p̂(1 − p̂)) + floor: favours uncertain prompts."""
    p = state.alpha / (state.alpha + state.beta)
    w = jnp.sqrt(p * (1.0 - p)) + floor
    return w / jnp.sum(w)


# ----------------------------------------------------------------------------------------
# DAPO (arXiv 2503.14476): dynamic sampling and overlong shaping.
# ----------------------------------------------------------------------------------------


def informative_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """[N/G] bool: True where a group's rewards are not all equal (DAPO dynamic sampling).

    A group whose rewards are all equal has zero advantage under every group-relative
    estimator, so it adds no signal; DAPO drops it and samples more prompts.
    """
    r = _groups(rewards, group_size)
    return jnp.any(r != r[:, :1], axis=-1)


def soft_overlong_punishment(
    lengths: jax.Array, *, max_response_len: int, cache_len: int, factor: float = 1.0
) -> jax.Array:
    """DAPO's length penalty in tokens, added to the reward.

    0 if L ≤ M − L_cache; ((M − L_cache) − L)/L_cache · factor if M − L_cache < L ≤ M;
    −factor beyond M. Measured in tokens, never characters.
    """
    if not 0 < cache_len <= max_response_len:
        raise ValueError(
            f"overlong cache_len must be in (0, max_response_len={max_response_len}], "
            f"got {cache_len}."
        )
    expected = max_response_len - cache_len
    lengths = lengths.astype(jnp.float32)
    penalty = (expected - lengths) / cache_len * factor
    return jnp.clip(jnp.where(lengths <= expected, 0.0, penalty), -factor, 0.0)


def overlong_filter(advantages: jax.Array, truncated: jax.Array) -> jax.Array:
    """Zero the advantage of truncated responses (no EOS within M), so they add no gradient."""
    return jnp.where(truncated, 0.0, advantages)


def compute(
    estimator: str,
    rewards: jax.Array,
    group_size: int,
    *,
    eps: float = 1e-6,
    ddof: int = 1,
    strata: jax.Array | None = None,
    blend: float = 1.0,
    spo_baseline_values: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Dispatches to an estimator by name, with a clear error for unknown names."""
    if estimator == "grpo":
        return grpo(rewards, group_size, eps=eps, ddof=ddof)
    if estimator == "mean_only":
        return mean_only(rewards, group_size)
    if estimator == "rloo":
        return rloo(rewards, group_size)
    if estimator == "reinforce_pp_baseline":
        return reinforce_pp_baseline(rewards, group_size, eps=eps, axis_name=axis_name)
    if estimator == "bnpo":
        return bnpo(rewards, group_size, axis_name=axis_name)
    if estimator == "stratified":
        if strata is None:
            raise ValueError("The 'stratified' estimator needs `strata` (one key per response).")
        return stratified(rewards, group_size, strata, blend=blend, eps=eps, ddof=ddof)
    if estimator == "spo":
        if spo_baseline_values is None:
            raise ValueError("The 'spo' estimator needs `spo_baseline_values` from spo_baseline().")
        return spo_advantages(rewards, spo_baseline_values, eps=eps, axis_name=axis_name)
    raise ValueError(
        f"Unknown advantage estimator {estimator!r}. Accepted: {', '.join(ESTIMATORS)}."
    )
