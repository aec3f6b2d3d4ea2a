"""Gradient-variance statistics of the loss aggregators, from per-response gradients.

The ΔL paper (arXiv 2509.07558; ALGORITHMS.md §1) views one step's policy gradient as

    ĝ = Σ_i c_i g_i,        g_i = A_i Σ_t ∇ log π(y_t | x, y_<t)   ([P] each)

(the gradient of the clipped surrogate at ratio 1), with the aggregator's coefficients
c_i from `deltal_jax.aggregation.response_coefficients`. Given K independent batches,
each aggregator's K estimates ĝ_1 … ĝ_K are reduced to their Gram matrix
(`EstimateSet`), from which come, with jackknife standard errors over batches:

    tr Cov ĝ      total variance: the unbiased sample variance summed over coordinates
    ‖E ĝ‖         from the mean of ĝ_j·ĝ_k over j ≠ k, which is unbiased for ‖E ĝ‖²
                  (the norm of the sample mean is inflated by tr Cov ĝ / K)
    CV            sqrt(tr Cov ĝ) / ‖E ĝ‖
    scaled noise  sqrt(tr Cov ĝ) / E Σ c_i: the CV up to a factor common to all
                  aggregators if every response has the same mean gradient μ (the
                  paper's model: E ĝ = (Σ c_i) μ); needs no estimate of any mean
    progress      E ĝ projected on a reference direction r, and the CV along r
    cos           cos(ĝ_k, r) per batch, and cos(mean ĝ, r)
    Σ c_i         per batch (mean and spread): 1/M for Dr. GRPO and ΔL on any lengths

Why scale-free figures: the aggregators differ in scale (GRPO's Σ c_i = mean_i 1/L_i,
DAPO's N/Σ_j L_j, ΔL's and Dr. GRPO's 1/M) and the learning rate absorbs any constant
scale, so the variance alone does not compare them. What a constant cannot absorb is a
scale that changes from batch to batch with the realised lengths (GRPO, DAPO): that
shows up as Σ c_i spread and, with noise-free gradients, as a CV above 0 while every
cosine is exactly 1.

The paper's model is Var(g_i) = V·L_i with independent rows and a common mean E[g_i];
then tr Cov ĝ = V Σ c_i² L_i, which ΔL with α = 1 minimises among aggregators with
Σ c_i = 1/M. More generally, with Var(g_i) ∝ L_i^β the minimiser is c_i ∝ L_i^−β, i.e.
ΔL with α = β; `fit_length_exponent` estimates β from per-response gradients, which is
how a real model's departure from the paper's assumption is measured.

`variance_proxy` is the cheap online version of the same model for the training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deltal_jax import aggregation as agg

# --------------------------------------------------------------------------------------
# Aggregators under comparison.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """One loss aggregator: `name` for reports, `mode` and `alpha` for
    `aggregation.response_coefficients` (alpha only matters for delta-l)."""

    name: str
    mode: str
    alpha: float = 1.0

    def coefficients(self, lengths: jax.Array, max_response_len: int) -> jax.Array:
        """c_i [N] for lengths [N]."""
        return agg.response_coefficients(
            lengths, mode=self.mode, max_response_len=max_response_len, alpha=self.alpha
        )

    @property
    def unbiased(self) -> bool:
        """Σ c_i = 1/M on any lengths (the paper's sense of unbiased)."""
        return agg.canonical_mode(self.mode) in (agg.SEQ_MEAN_TOKEN_SUM_NORM, agg.DELTA_L)


_NAMED = {
    "grpo": ("GRPO", agg.SEQ_MEAN_TOKEN_MEAN),
    "dapo": ("DAPO", agg.TOKEN_MEAN),
    "dr_grpo": ("Dr. GRPO", agg.SEQ_MEAN_TOKEN_SUM_NORM),
    "seq_sum": ("seq-mean-token-sum", agg.SEQ_MEAN_TOKEN_SUM),
}
DEFAULT_AGGREGATORS = "grpo,dapo,dr_grpo,delta-l:0.5,delta-l:0.75,delta-l:1"


def parse_aggregators(spec: str) -> tuple[Aggregator, ...]:
    """Parses a comma-separated list: grpo, dapo, dr_grpo, seq_sum, or delta-l:α.

    >>> [a.name for a in parse_aggregators("grpo,delta-l:0.75")]
    ['GRPO', 'ΔL α=0.75']
    """
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if item in _NAMED:
            out.append(Aggregator(*_NAMED[item]))
            continue
        head, _, tail = item.partition(":")
        if head in ("delta-l", "delta_l") and tail:
            try:
                alpha = float(tail)
            except ValueError:
                alpha = -1.0
            if 0.0 <= alpha <= 1.0:
                out.append(Aggregator(f"ΔL α={alpha:g}", agg.DELTA_L, alpha))
                continue
        raise ValueError(
            f"Unknown aggregator {item!r} in {spec!r}. Accepted: "
            f"{', '.join(_NAMED)}, or delta-l:α with α in [0, 1] (e.g. delta-l:0.75)."
        )
    if len({a.name for a in out}) != len(out):
        raise ValueError(f"Aggregator list {spec!r} names one aggregator twice.")
    return tuple(out)


def coefficient_matrix(
    aggregators: Sequence[Aggregator], lengths: jax.Array, max_response_len: int
) -> jax.Array:
    """[A, N]: row a holds aggregator a's c_i for lengths [N]."""
    return jnp.stack([a.coefficients(lengths, max_response_len) for a in aggregators])


# --------------------------------------------------------------------------------------
# Statistics of K estimates.
# --------------------------------------------------------------------------------------


class RunningMean:
    """Streaming mean of i.i.d. vectors x_1 … x_K, with ‖E x‖² and tr Cov x.

    Keeps S = Σ_k x_k and Q = Σ_k ‖x_k‖² in float64, so K vectors of a large model never
    have to be held at once. Since x_j and x_k are independent for j ≠ k,

        ‖E x‖² ≈ (‖S‖² − Q) / (K (K − 1))    (the mean of x_j·x_k over j ≠ k: unbiased)
        tr Cov x ≈ (Q − ‖S‖²/K) / (K − 1)     (the unbiased sample variance, summed)

    whereas ‖S/K‖² overestimates ‖E x‖² by tr Cov x / K, which matters when each x_k is
    mostly noise (one policy-gradient batch typically is).
    """

    def __init__(self):
        self.count = 0
        self.total: np.ndarray | None = None
        self.sq_norms = 0.0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1)
        if self.total is None:
            self.total = np.zeros_like(x)
        elif x.shape != self.total.shape:
            raise ValueError(f"vector has {x.size} entries, earlier ones {self.total.size}.")
        self.count += 1
        self.total += x
        self.sq_norms += float(x @ x)

    def _need_two(self) -> None:
        if self.count < 2:
            raise ValueError(f"need at least 2 vectors, got {self.count}.")

    @property
    def mean(self) -> np.ndarray:
        self._need_two()
        return self.total / self.count

    def mean_norm_sq(self) -> float:
        """Unbiased estimate of ‖E x‖² (may come out negative when noise dominates)."""
        self._need_two()
        k = self.count
        return (float(self.total @ self.total) - self.sq_norms) / (k * (k - 1))

    def total_variance(self) -> float:
        self._need_two()
        k = self.count
        return (self.sq_norms - float(self.total @ self.total) / k) / (k - 1)


def _figures(k, sum_gram, trace_gram, sum_coef, sum_proj, reference_norm):
    """The figures of `EstimateSet.summary` from sums over k estimates: Σ_jk ĝ_j·ĝ_k,
    Σ_k ‖ĝ_k‖², Σ_k Σ_i c_i and Σ_k ĝ_k·r. Broadcasts, so the same formulas give the
    full-sample values and the K leave-one-out values of the jackknife."""
    with np.errstate(divide="ignore", invalid="ignore"):
        total_var = (trace_gram - sum_gram / k) / (k - 1)
        signal_sq = (sum_gram - trace_gram) / (k * (k - 1))
        signal = np.where(signal_sq > 0, np.sqrt(np.abs(signal_sq)), np.nan)
        out = {
            "total_variance": total_var,
            "signal_norm": signal,
            "cv": np.sqrt(total_var) / signal,
            "scaled_noise": np.sqrt(total_var) / (sum_coef / k),
        }
        if sum_proj is not None:
            progress = sum_proj / k / reference_norm
            out["progress"] = progress
            out["progress_cv"] = np.where(progress > 0, np.sqrt(total_var) / progress, np.inf)
    return out


def _jackknife_se(loo: np.ndarray) -> float:
    """Jackknife standard error from K leave-one-out values."""
    k = loo.shape[0]
    if not np.all(np.isfinite(loo)):
        return float("nan")
    return float(np.sqrt((k - 1) / k * np.sum((loo - loo.mean()) ** 2)))


@dataclasses.dataclass
class EstimateSet:
    """K i.i.d. estimates ĝ_1 … ĝ_K of one aggregator, reduced to their Gram matrix.

    Attributes:
      gram: [K, K] ĝ_j · ĝ_k (float64).
      coef_sums: [K] Σ_i c_i of each batch.
      proj: [K] ĝ_k · r with the reference direction r (None without one).
      reference_sq: ‖r‖².
      reference_norm: the length used for progress along r, ideally an unbiased estimate
        of ‖E r‖ (`RunningMean.mean_norm_sq`); with r independent of the ĝ_k,
        E[ĝ_k · r] = E ĝ · E r, so mean(proj)/‖E r‖ is E ĝ projected on E r's direction.
    """

    gram: np.ndarray
    coef_sums: np.ndarray
    proj: np.ndarray | None = None
    reference_sq: float = float("nan")
    reference_norm: float = float("nan")

    @classmethod
    def from_estimates(
        cls,
        estimates: np.ndarray,
        coef_sums: np.ndarray,
        reference: np.ndarray | None = None,
        reference_norm: float | None = None,
    ) -> EstimateSet:
        """From estimates [K, P]; `reference_norm` defaults to ‖reference‖."""
        x = np.asarray(estimates, np.float64)
        if x.ndim != 2 or x.shape[0] < 3:
            raise ValueError(f"estimates must have shape [K >= 3, P], got {x.shape}.")
        coef_sums = np.asarray(coef_sums, np.float64).reshape(-1)
        if coef_sums.shape != (x.shape[0],):
            raise ValueError(f"coef_sums must have shape [{x.shape[0]}], got {coef_sums.shape}.")
        if reference is None:
            return cls(x @ x.T, coef_sums)
        r = np.asarray(reference, np.float64).reshape(-1)
        if r.shape != x.shape[1:]:
            raise ValueError(f"reference must have shape [{x.shape[1]}], got {r.shape}.")
        ref_sq = float(r @ r)
        norm = float(np.sqrt(ref_sq)) if reference_norm is None else float(reference_norm)
        return cls(x @ x.T, coef_sums, x @ r, ref_sq, norm)

    def _leave_one_out(self) -> dict[str, np.ndarray]:
        """Each figure of `_figures` with batch k left out, for k = 1 … K."""
        g, c, k = self.gram, self.coef_sums, self.gram.shape[0]
        diag = np.diag(g)
        sum_g = g.sum() - 2.0 * g.sum(1) + diag
        sum_p = None if self.proj is None else self.proj.sum() - self.proj
        return _figures(k - 1, sum_g, np.trace(g) - diag, c.sum() - c, sum_p, self.reference_norm)

    def summary(self) -> dict[str, float]:
        """Statistics of the estimates (scale-dependent ones in the estimates' units):

          num_batches      K
          coef_sum_mean, coef_sum_std   Σ_i c_i per batch (sample std, ddof = 1)
          mean_norm        ‖ĝ̄‖, the norm of the sample mean (inflated by noise)
          signal_norm      sqrt of the unbiased estimate of ‖E ĝ‖² (NaN if it is ≤ 0)
          total_variance   tr Cov ĝ, unbiased
          cv               sqrt(tr Cov ĝ) / ‖E ĝ‖
          scaled_noise     sqrt(tr Cov ĝ) / mean Σ c_i: the CV up to the common factor
                           1/‖μ‖ when E ĝ = (Σ c_i) μ (the paper's model), so it ranks
                           aggregators without estimating any mean
        With a reference r:
          progress         mean(ĝ_k · r) / reference_norm, E ĝ projected on r's direction
          progress_cv      sqrt(tr Cov ĝ) / progress: noise per unit of expected progress
                           along r (includes any tilt of E ĝ away from r)
          cos_mean, cos_std   per-batch cos(ĝ_k, r)
          cos_of_mean      cos(ĝ̄, r)
        and `<figure>_se`, jackknife standard errors over batches for total_variance,
        cv, scaled_noise and progress_cv (the reference held fixed).
        """
        g, k = self.gram, self.gram.shape[0]
        sum_p = None if self.proj is None else self.proj.sum()
        full = _figures(k, g.sum(), np.trace(g), self.coef_sums.sum(), sum_p, self.reference_norm)
        loo = self._leave_one_out()
        out = {
            "num_batches": k,
            "coef_sum_mean": float(self.coef_sums.mean()),
            "coef_sum_std": float(self.coef_sums.std(ddof=1)),
            "mean_norm": float(np.sqrt(g.sum()) / k),
            **{name: float(v) for name, v in full.items()},
        }
        for name in ("total_variance", "cv", "scaled_noise", "progress_cv"):
            if name in loo:
                out[f"{name}_se"] = _jackknife_se(loo[name])
        if self.proj is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = self.proj / np.sqrt(np.diag(g) * self.reference_sq)
                cos_of_mean = self.proj.sum() / np.sqrt(g.sum() * self.reference_sq)
            out.update({
                "cos_mean": float(np.mean(cos)),
                "cos_std": float(np.std(cos, ddof=1)),
                "cos_of_mean": float(cos_of_mean),
            })  # fmt: skip
        return out

    def ratio_to(self, other: EstimateSet, figure: str) -> tuple[float, float]:
        """(figure of self / figure of other, jackknife se). Both sets must come from the
        same K batches (row k of each is batch k): leaving out batch k from both keeps
        the pairing, so noise the two share cancels in the ratio's se."""
        if other.gram.shape != self.gram.shape:
            raise ValueError("ratio_to needs estimate sets from the same batches.")
        mine, theirs = self._leave_one_out(), other._leave_one_out()
        if figure not in mine:
            raise ValueError(f"unknown figure {figure!r}; accepted: {', '.join(mine)}.")
        with np.errstate(divide="ignore", invalid="ignore"):  # zero estimates: NaN, not raise
            value = np.float64(self.summary()[figure]) / other.summary()[figure]
            return float(value), _jackknife_se(mine[figure] / theirs[figure])


def variance_statistics(
    per_response_grads: jax.Array,
    lengths: jax.Array,
    aggregators: Sequence[Aggregator],
    *,
    max_response_len: int,
    reference: jax.Array | None = None,
) -> dict[str, EstimateSet]:
    """Each aggregator's K estimates ĝ_k = Σ_i c_i g_i from per-response gradients.

    Args:
      per_response_grads: [K, N, P], g_i of batch k (advantage included).
      lengths: [K, N] (or [N]: the same lengths in every batch) response lengths L_i.
      aggregators: the estimators to compare (see `parse_aggregators`).
      max_response_len: M.
      reference: [P] direction for cosines and progress (optional).

    Returns:
      {aggregator name: EstimateSet}; `.summary()` gives the figures.
    """
    grads = jnp.asarray(per_response_grads, jnp.float32)
    if grads.ndim != 3:
        raise ValueError(f"per_response_grads must have shape [K, N, P], got {grads.shape}.")
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.float32), grads.shape[:2])
    coef = jax.jit(jax.vmap(lambda lens: coefficient_matrix(aggregators, lens, max_response_len)))(
        lengths
    )  # [K, A, N]
    estimates = np.asarray(jnp.einsum("kan,knp->akp", coef, grads))  # [A, K, P]
    sums = np.asarray(coef.sum(-1)).T  # [A, K]
    return {
        a.name: EstimateSet.from_estimates(est, s, reference)
        for a, est, s in zip(aggregators, estimates, sums, strict=True)
    }


# --------------------------------------------------------------------------------------
# The paper's variance model: analytic variance, the online proxy, the length exponent.
# --------------------------------------------------------------------------------------


def variance_proxy(
    coefficients: jax.Array,
    lengths: jax.Array,
    advantages: jax.Array,
    *,
    exponent: float = 1.0,
) -> dict[str, jax.Array]:
    """A per-step estimate of the update's variance under the paper's model, from
    quantities the trainer already has (no extra gradients).

    Model (ALGORITHMS.md §1, with the advantage made explicit): rows are independent,
    g_i = A_i s_i with Var(s_i) = V·L_i^β and a mean E[g_i] = μ shared by all rows. Then

        tr Cov(ĝ | A, L) = V · proxy,        proxy    = Σ_i c_i² A_i² L_i^β
        E[ĝ | L]         = (Σ_i c_i) μ,      relative = proxy / (Σ_i c_i)²

    so relative = CV² · ‖μ‖²/V. V/‖μ‖² belongs to the policy and task, not to the
    aggregator, so `relative` compares aggregators on the same batch, scale-free like the
    CV, and its trend over a run tracks CV² up to the drift of V/‖μ‖². `proxy` itself
    carries the aggregator's scale (it is what changes the update size at a fixed
    learning rate). Zero-advantage rows (groups with equal rewards) add nothing; padding
    rows (L_i = 0, c_i = 0) neither. With A_i = 1 and β = 1 it is the analytic
    Σ c_i² L_i that ΔL with α = 1 minimises at fixed Σ c_i.

    Args:
      coefficients: [N] c_i of the step (before any mini-batch scaling).
      lengths: [N] L_i.
      advantages: [N] A_i.
      exponent: β of Var(s_i) ∝ L_i^β (1 in the paper; see `fit_length_exponent`).

    Returns:
      {"proxy": Σ c_i² A_i² L_i^β, "relative": proxy / (Σ c_i)², 0 for an empty batch}.
    """
    c = jnp.asarray(coefficients, jnp.float32)
    lengths = jnp.asarray(lengths, jnp.float32)
    a = jnp.asarray(advantages, jnp.float32)
    if not c.shape == lengths.shape == a.shape or c.ndim != 1:
        raise ValueError(
            f"coefficients {c.shape}, lengths {lengths.shape} and advantages {a.shape} "
            "must all have the same shape [N]."
        )
    size = jnp.where(lengths > 0, jnp.maximum(lengths, 1.0) ** exponent, 0.0)
    proxy = jnp.sum(c**2 * a**2 * size)
    total = jnp.sum(c)
    relative = jnp.where(total != 0, proxy / jnp.where(total != 0, total, 1.0) ** 2, 0.0)
    return {"proxy": proxy, "relative": relative}


def fit_length_exponent(
    lengths: np.ndarray, values: np.ndarray, *, min_count: int = 2
) -> dict[str, object]:
    """Fits E[value | L] = a · L^β: the exponent of a per-response variance in the length.

    Responses are grouped by their integer length; each length's mean value estimates
    E[value | L] (the mean, not the mean of logs, so the fit is of the expectation,
    as in Var(g_i) = V·L_i^β). Then log mean = log a + β log L by least squares
    weighted by the number of responses at each length. Lengths with fewer than
    `min_count` responses or a zero mean are left out.

    Returns:
      exponent β, its standard error `exponent_se` (from the weighted residuals; NaN with
      fewer than 3 lengths), scale a, and the per-length table `lengths`, `counts`,
      `means` (all lengths, including those left out of the fit).
    """
    lengths = np.asarray(lengths).reshape(-1)
    values = np.asarray(values, np.float64).reshape(-1)
    if lengths.shape != values.shape:
        raise ValueError(f"lengths {lengths.shape} and values {values.shape} must match.")
    keys, inverse, counts = np.unique(
        np.rint(lengths).astype(int), return_inverse=True, return_counts=True
    )
    means = np.bincount(inverse, weights=values) / counts
    use = (counts >= min_count) & (means > 0) & (keys > 0)
    table = {"lengths": keys.tolist(), "counts": counts.tolist(), "means": means.tolist()}
    if use.sum() < 2:
        return {"exponent": float("nan"), "exponent_se": float("nan"), "scale": float("nan"),
                **table}  # fmt: skip
    x, y, w = np.log(keys[use]), np.log(means[use]), counts[use].astype(np.float64)
    x_bar, y_bar = np.average(x, weights=w), np.average(y, weights=w)
    sxx = np.sum(w * (x - x_bar) ** 2)
    beta = np.sum(w * (x - x_bar) * (y - y_bar)) / sxx
    intercept = y_bar - beta * x_bar
    resid = y - intercept - beta * x
    n = use.sum()
    se = np.sqrt(np.sum(w * resid**2) / (n - 2) / sxx) if n > 2 else float("nan")
    return {"exponent": float(beta), "exponent_se": float(se), "scale": float(np.exp(intercept)),
            **table}  # fmt: skip
