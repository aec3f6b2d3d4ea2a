"""Loss aggregation: how per-token policy-gradient terms become one scalar loss.

Every aggregator in the ΔL paper (arXiv 2509.07558) is one choice of per-response
coefficient c_i in

    loss = − Σ_i c_i Σ_t m[i,t] · s[i,t]                     (ALGORITHMS.md §0)

with L_i = Σ_t m[i,t], N the number of responses and M the configured maximum response
length (a config constant, never the padded width of the batch):

    token-mean               c_i = 1 / Σ_j L_j                 (DAPO Norm)
    seq-mean-token-mean      c_i = 1 / (N · L_i)               (GRPO Norm)
    seq-mean-token-sum       c_i = 1 / N
    seq-mean-token-sum-norm  c_i = 1 / (N · M)                 (Dr. GRPO Norm)
    delta-l (α)              c_i = L_i^−α / (M · Σ_j L_j^−α)   (ΔL / VL Norm)

The work is split in two so that gradient accumulation is exact:

1. `response_coefficients` computes c_i ONCE per optimiser step from the lengths of the
   whole batch that step normalises over (across micro-batches and data-parallel
   devices; pass `axis_name` when each device only holds its shard).
2. `aggregate` applies those global c_i to any micro-batch; the loss of the full batch is
   the plain sum of the micro-batch losses, so it does not depend on how the batch is
   split, sharded or padded.

Rows with L_i = 0 are padding, not responses: they get c_i = 0 and are not counted in N
or in any normaliser. A batch with no valid row gets all-zero coefficients, so its loss
and gradient are exactly 0 (never NaN); `num_valid` lets callers detect that case.

Which rows form "the batch" is the caller's choice. The trainer passes the whole rollout
batch, so ΔL weights stay fixed across PPO mini-batches and epochs, as in the reference
implementation; a step on one of P equal mini-batches then scales its loss by P.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOKEN_MEAN = "token-mean"
SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"
DELTA_L = "delta-l"
# verl's default worker normalises each micro-batch by its own token count and averages
# the micro-batch losses. That is not a fixed function of the global batch: it changes
# with the split. It is here only to reproduce the reference "DAPO Norm" numbers.
TOKEN_MEAN_MICROBATCH_LEGACY = "token-mean-microbatch-legacy"

MODES = (
    TOKEN_MEAN,
    SEQ_MEAN_TOKEN_MEAN,
    SEQ_MEAN_TOKEN_SUM,
    SEQ_MEAN_TOKEN_SUM_NORM,
    DELTA_L,
    TOKEN_MEAN_MICROBATCH_LEGACY,
)

# Names other libraries and papers use for the same aggregators.
ALIASES = {
    # TRL GRPOTrainer `loss_type`.
    "grpo": SEQ_MEAN_TOKEN_MEAN,
    "dapo": TOKEN_MEAN,
    "dr_grpo": SEQ_MEAN_TOKEN_SUM_NORM,
    # TRL's "bnpo" divides by the token count of the local (per-device, per-micro-batch)
    # batch. It is unrelated to the BNPO advantage estimator (arXiv 2506.02864).
    "bnpo": TOKEN_MEAN_MICROBATCH_LEGACY,
    # Tunix `loss_agg_mode`.
    "sequence-mean-token-mean": SEQ_MEAN_TOKEN_MEAN,
    "sequence-mean-token-scale": SEQ_MEAN_TOKEN_SUM_NORM,
    "sequence-mean-token-sum": SEQ_MEAN_TOKEN_SUM,
    # Paper names.
    "grpo-norm": SEQ_MEAN_TOKEN_MEAN,
    "dapo-norm": TOKEN_MEAN,
    "dr-grpo-norm": SEQ_MEAN_TOKEN_SUM_NORM,
    "vl-norm": DELTA_L,
    "delta_l": DELTA_L,
    "deltal": DELTA_L,
}

SCOPES = ("batch", "group")


def canonical_mode(mode: str) -> str:
    """Returns the canonical aggregator name for `mode` or one of its aliases."""
    key = mode.strip().lower()
    if key in MODES:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise ValueError(
        f"Unknown loss aggregation mode {mode!r}. Accepted: {', '.join(MODES)}; "
        f"aliases: {', '.join(sorted(ALIASES))}."
    )


def validate(
    mode: str,
    *,
    max_response_len: int,
    alpha: float = 1.0,
    scope: str = "batch",
    group_size: int | None = None,
) -> str:
    """Checks an aggregation configuration and returns the canonical mode name."""
    mode = canonical_mode(mode)
    if not isinstance(max_response_len, int) or max_response_len < 1:
        raise ValueError(f"max_response_len must be a positive int, got {max_response_len!r}.")
    if mode == DELTA_L:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"delta-l alpha must be in [0, 1], got {alpha!r}.")
        if scope not in SCOPES:
            raise ValueError(f"delta-l scope must be one of {SCOPES}, got {scope!r}.")
        if scope == "group" and (group_size is None or group_size < 1):
            raise ValueError(f"delta-l scope='group' needs group_size >= 1, got {group_size!r}.")
    return mode


def _global_sum(x: jax.Array, axis_name: str | tuple[str, ...] | None) -> jax.Array:
    """Σ over every element of x, and over devices when running under a named axis."""
    total = jnp.sum(x)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0: an empty batch contributes nothing, not NaN."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def response_lengths(mask: jax.Array) -> jax.Array:
    """L_i = Σ_t m[i,t] as float32.  mask: [N, T] -> [N]."""
    return jnp.sum(mask.astype(jnp.float32), axis=-1)


def response_coefficients(
    lengths: jax.Array,
    *,
    mode: str,
    max_response_len: int,
    alpha: float = 1.0,
    scope: str = "batch",
    group_size: int | None = None,
    num_microbatches: int = 1,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Per-response coefficients c_i of `loss = −Σ_i c_i Σ_t m[i,t] s[i,t]`.

    Args:
      lengths: [N] response lengths L_i (token counts; 0 marks a padding row). Under
        `pmap`/`shard_map` with `axis_name`, the local shard of the global batch.
      mode: an aggregator name from `MODES` or `ALIASES`.
      max_response_len: M, the configured maximum response length.
      alpha: ΔL exponent α in [0, 1]; α = 0 is Dr. GRPO Norm, α = 1 minimum variance.
      scope: ΔL normalisation scope. "batch" (the reference): Σ_j L_j^−α over every
        response. "group": within each group g of `group_size` contiguous rows,
        c_i = n_g · L_i^−α / (N · M · Σ_{j∈g} L_j^−α), so Σ_i c_i is still 1/M.
      group_size: G, rows per group (groups are contiguous and never split across
        devices). Needed for scope="group".
      num_microbatches: only for the legacy per-micro-batch token mean: the number of
        contiguous chunks (micro-batches × data-parallel ranks) that each normalise by
        their own token count; c_i = 1 / (K · Σ_{j in chunk(i)} L_j).
      axis_name: mapped axis (or axes) to reduce normalisers over.

    Returns:
      c: [N] float32 coefficients, zero for rows with L_i = 0.
    """
    mode = validate(
        mode, max_response_len=max_response_len, alpha=alpha, scope=scope, group_size=group_size
    )
    lengths = jnp.asarray(lengths, jnp.float32)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must have shape [N], got {lengths.shape}.")
    valid = (lengths > 0).astype(jnp.float32)
    num_valid = _global_sum(valid, axis_name)
    m = float(max_response_len)

    if mode == TOKEN_MEAN:
        return valid * _safe_div(1.0, _global_sum(lengths, axis_name))
    if mode == SEQ_MEAN_TOKEN_MEAN:
        return valid * _safe_div(1.0, num_valid * jnp.maximum(lengths, 1.0))
    if mode == SEQ_MEAN_TOKEN_SUM:
        return valid * _safe_div(1.0, num_valid)
    if mode == SEQ_MEAN_TOKEN_SUM_NORM:
        return valid * _safe_div(1.0, num_valid * m)
    if mode == TOKEN_MEAN_MICROBATCH_LEGACY:
        return _legacy_microbatch_coefficients(lengths, num_microbatches)

    # ΔL: w_i = max(L_i, 1)^−α on valid rows. The max guards 0^−α; padding rows get w = 0.
    w = valid * jnp.maximum(lengths, 1.0) ** (-float(alpha))
    if scope == "batch":
        return _safe_div(w, m * _global_sum(w, axis_name))
    if lengths.shape[0] % group_size:
        raise ValueError(
            f"scope='group' needs whole groups on each device: {lengths.shape[0]} rows "
            f"is not a multiple of group_size={group_size}."
        )
    w_g = w.reshape(-1, group_size)  # [n_groups, G]
    n_g = valid.reshape(-1, group_size).sum(-1, keepdims=True)  # [n_groups, 1]
    c = _safe_div(w_g * n_g, num_valid * m * w_g.sum(-1, keepdims=True))
    return c.reshape(-1)


def _legacy_microbatch_coefficients(lengths: jax.Array, num_microbatches: int) -> jax.Array:
    """c_i = 1 / (K · tokens in i's micro-batch), for K contiguous micro-batches."""
    n = lengths.shape[0]
    if num_microbatches < 1 or n % num_microbatches:
        raise ValueError(
            f"num_microbatches must be a positive divisor of the batch size {n}, "
            f"got {num_microbatches}."
        )
    chunks = lengths.reshape(num_microbatches, -1)  # [K, n/K]
    tokens = chunks.sum(-1, keepdims=True)
    valid = (chunks > 0).astype(jnp.float32)
    return (valid * _safe_div(1.0, num_microbatches * tokens)).reshape(-1)


def masked_row_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(1/L_i) Σ_t m[i,t] x[i,t]: [N, T] -> [N]; 0 for empty rows."""
    total = jnp.sum(jnp.where(mask.astype(bool), x, 0.0), axis=-1)
    return total / jnp.maximum(response_lengths(mask), 1.0)


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    coefficients: jax.Array,
    *,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Σ_i c_i Σ_t m[i,t] · values[i,t] over this (micro-)batch, psum'd over `axis_name`.

    values, mask: [n, T] (any T: padding columns have m = 0); coefficients: [n], the
    global c_i of these rows. Summing the result over micro-batches gives the full-batch
    aggregate exactly.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {values.shape} and mask {mask.shape} must have equal shapes.")
    if coefficients.shape != values.shape[:1]:
        raise ValueError(
            f"coefficients must have shape [{values.shape[0]}] (one per row), "
            f"got {coefficients.shape}."
        )
    masked = jnp.where(mask.astype(bool), values, 0.0)  # 0·NaN in padding would be NaN
    per_row = jnp.sum(masked, axis=-1)
    return _global_sum(coefficients * per_row, axis_name)


def coefficient_stats(
    coefficients: jax.Array, lengths: jax.Array, *, max_response_len: int
) -> dict[str, jax.Array]:
    """Diagnostics for logging: Σ c_i (1/M when unbiased), H/M, and the c_i spread.

    H is the harmonic mean of the valid lengths; ΔL(α=1) = (H/M) · GRPO Norm.
    """
    valid = lengths > 0
    n = jnp.sum(valid)
    inv_len = jnp.where(valid, 1.0 / jnp.maximum(lengths, 1.0), 0.0)
    harmonic = _safe_div(n.astype(jnp.float32), jnp.sum(inv_len))
    c_valid = jnp.where(valid, coefficients, jnp.nan)
    return {
        "coef_sum": jnp.sum(coefficients),
        "coef_sum_times_m": jnp.sum(coefficients) * max_response_len,
        "harmonic_len_over_m": harmonic / max_response_len,
        "coef_max_over_min": jnp.nanmax(c_valid) / jnp.nanmin(c_valid),
    }
