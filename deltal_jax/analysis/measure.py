"""Gradient variance of the loss aggregators on a real policy and task.

For a policy (an HF-layout checkpoint, or the tiny model the default run builds) this
draws independent rollout batches as one training step does (B distinct prompts drawn
from the task's training records, G responses each from the policy at the rollout
temperature, verifier rewards, the configured advantage estimator), computes every
response's score s_i = Σ_t ∇ log π(y_t | x, y_<t) with `jax.vmap(jax.grad(·))` over rows,
and feeds g_i = A_i s_i to the model-free statistics of `variance.py`. (Per-response
gradients cost what one batched backward pass costs: the FLOPs are the same.)

Two passes with independent random streams:

1. Reference, R batches: r = the mean over R·N responses of g_i, i.e. M times the
   Dr. GRPO update averaged over R batches. It is unbiased for
       μ = E_x E_{y_1..G ~ π(·|x)} [A_1 ∇ log π(y_1 | x)],
   the expected per-response update under the configured advantages. With GRPO's
   std-normalised advantages μ is ∇J with each prompt weighted by 1/std of its group's
   rewards, not ∇J itself; it is the expected update of every aggregator whose Σ c_i is
   the constant 1/M, up to that factor, if E[g_i | L_i] does not depend on L_i (the
   paper's assumption). Its own noise is reported under `reference`.
2. Measurement, K batches: each aggregator's estimate ĝ_k (kept for the Gram matrix),
   Σ c_i, the online proxy, and per response L_i, A_i, ‖s_i‖², g_i·r and ‖g_i − r‖².

The paper's assumption Var(g_i) = V·L_i is tested directly: `length_fit` fits
E[‖g_i − r‖² | L] ∝ L^β (what the aggregators' variances are made of), and separately
E[‖s_i‖² | L] (the token-independence part) and E[A_i² | L] (how the advantage varies
with length). With independent rows, tr Cov ĝ = Σ c_i² v(L_i) for the per-length
variance v; `predicted_total_variance` evaluates it with the measured v, so its gap to
the measured tr Cov is what correlated rows (GRPO advantages share a group's mean and
std) and a length-dependent E[g_i | L_i] add. The latter is measured as well: the
per-length mean of g_i·r / ‖E r‖² (`length_fit["signal"]`) is 1 at every length under
the paper's model; where it falls with L, long responses carry less of the common
direction than the model assumes.

Not reproduced: DAPO dynamic sampling, overlong shaping, KL. The estimate is the
gradient of the clipped surrogate at ratio 1 (the first PPO mini-batch of a step).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from deltal_jax import advantages as adv_lib
from deltal_jax import sampling
from deltal_jax.analysis.variance import (
    Aggregator,
    EstimateSet,
    RunningMean,
    coefficient_matrix,
    fit_length_exponent,
    variance_proxy,
)
from deltal_jax.data import get_task, pad_prompt
from deltal_jax.data import pipeline as data_pipeline
from deltal_jax.models import Tokenizer, load_model, load_tokenizer, response_logprobs
from deltal_jax.rewards import RewardPool, score_batch

# --------------------------------------------------------------------------------------
# Gradients of one batch.
# --------------------------------------------------------------------------------------


def _response_logp_sum(graphdef, params, prompt_ids, prompt_mask, resp_ids, resp_mask, temp):
    """[n] Σ_t m[i,t] log π(y_it) for a batch of rows."""
    model = nnx.merge(graphdef, params)
    lp = response_logprobs(model, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature=temp)
    return jnp.sum(lp.logp, axis=-1)  # logp is 0 outside the mask


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk_rows"))
def per_response_scores(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    resp_ids: jax.Array,
    resp_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 8,
) -> jax.Array:
    """s_i = ∇_θ Σ_t m[i,t] log π_θ(y_it | x_i, y_i,<t), one flattened row per response.

    Inputs are [N, P] prompts and [N, M] responses; returns [N, |θ|] float32, in the
    order of `jax.flatten_util.ravel_pytree(params)`. Rows go through `jax.vmap(jax.grad)`
    `chunk_rows` at a time (`lax.map` with `batch_size`), which bounds the per-example
    activations alive at once. At ratio 1 the clipped surrogate's gradient for row i is
    A_i s_i, so Σ_i c_i A_i s_i is the ascent direction of the aggregated loss.
    """

    def row_score(row):
        one = jax.tree.map(lambda x: x[None], row)
        grad = jax.grad(lambda p: _response_logp_sum(graphdef, p, *one, temperature)[0])(params)
        return ravel_pytree(grad)[0]

    return jax.lax.map(
        row_score, (prompt_ids, prompt_mask, resp_ids, resp_mask), batch_size=chunk_rows
    )


@jax.jit
def _mean_gradient(scores, advantages):
    """(1/N) Σ_i A_i s_i: M × the Dr. GRPO update of the batch."""
    return advantages @ scores / advantages.shape[0]


@jax.jit
def _batch_reductions(scores, advantages, coef, reference):
    """Estimates [A, P] = (c ⊙ A) s; per row ‖s_i‖², g_i·r and ‖g_i − r‖² with
    g_i = A_i s_i (without forming the [N, P] array of g_i)."""
    estimates = (coef * advantages) @ scores
    s_sq = jnp.sum(scores * scores, axis=-1)
    g_dot_r = advantages * (scores @ reference)
    g_dev = advantages**2 * s_sq - 2.0 * g_dot_r + reference @ reference
    return estimates, s_sq, g_dot_r, g_dev


# --------------------------------------------------------------------------------------
# Policy and rollouts.
# --------------------------------------------------------------------------------------


def load_policy(
    policy: str, config: ml_collections.ConfigDict, cache_dir: str
) -> tuple[nnx.Module, Tokenizer, str]:
    """(model, tokenizer, directory) of `policy`: an HF-layout checkpoint directory, or
    "default" for the policy the trainer would start from with `config` (its
    `model.hf_dir` if set, else the warmed-up tiny model, built once under `cache_dir`,
    as the trainer builds it under its work directory, by the trainer's own code)."""
    from deltal_jax import train  # heavy; only needed here

    if policy == "default":
        records, _ = train.load_records(config)
        directory = train.prepare_policy_dir(config, cache_dir, records, None)
    elif os.path.isfile(os.path.join(policy, "config.json")):
        directory = policy
    else:
        raise ValueError(
            f"policy={policy!r} is neither 'default' nor an HF-layout checkpoint directory "
            "(config.json, *.safetensors, tokenizer.json)."
        )
    model, _ = load_model(directory, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
    return model, load_tokenizer(directory), directory


@dataclasses.dataclass
class RolloutSource:
    """Draws i.i.d. rollout batches: B distinct prompts uniformly from `records`, G
    samples each, rewards, advantages. Batch (stream, index) is a fixed function of the
    seed, so two streams never share a prompt draw or a sampling key."""

    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    records: Sequence[dict[str, Any]]
    pool: RewardPool
    seed: int = 0

    def __post_init__(self):
        c = self.config
        task = get_task(c.data.task)
        encoded = [
            pad_prompt(self.tokenizer.encode(data_pipeline.render_prompt(task, r, c.data.template)),
                       c.rollout.max_prompt_len, self.tokenizer.pad_id)
            for r in self.records
        ]  # fmt: skip
        self.prompt_ids = np.stack([e[0] for e in encoded])
        self.prompt_mask = np.stack([e[1] for e in encoded])
        self.metas = [task.reward_meta(r) for r in self.records]
        self.verifier = c.reward.verifier or task.verifier
        self.sample_cfg = sampling.SamplingConfig(
            max_new_tokens=c.rollout.max_response_len, temperature=c.rollout.temperature,
            top_k=c.rollout.top_k, top_p=c.rollout.top_p,
            eos_ids=self.tokenizer.eos_ids, pad_id=self.tokenizer.pad_id,
            cache_phases=c.rollout.cache_phases,
        )  # fmt: skip
        if len(self.records) < c.rollout.prompts_per_step:
            raise ValueError(
                f"{len(self.records)} records cannot supply {c.rollout.prompts_per_step} "
                "distinct prompts per batch (config.rollout.prompts_per_step)."
            )

    def draw(self, stream: int, index: int) -> dict[str, np.ndarray]:
        """One batch: prompt_ids/prompt_mask [N, P], resp_ids/resp_mask [N, M], lengths,
        rewards, advantages [N], with N = B·G laid out group by group."""
        c = self.config
        b, g = c.rollout.prompts_per_step, c.rollout.group_size
        rng = np.random.default_rng([self.seed, stream, index])
        rows = np.repeat(rng.choice(len(self.records), size=b, replace=False), g)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), stream), index)
        out = jax.device_get(sampling.generate_split(
            self.graphdef, self.params, self.prompt_ids[rows], self.prompt_mask[rows], key,
            self.sample_cfg,
        ))  # fmt: skip
        texts = [
            self.tokenizer.decode(t[:n].tolist())
            for t, n in zip(out.tokens, out.lengths, strict=True)
        ]
        rewards = score_batch(texts, [self.metas[i] for i in rows], self.verifier,
                              timeout_s=c.reward.timeout_s, pool=self.pool).scores  # fmt: skip
        advantages = adv_lib.compute(c.advantage.estimator, jnp.asarray(rewards), g,
                                     eps=c.advantage.eps, ddof=c.advantage.ddof)  # fmt: skip
        return {
            "prompt_ids": self.prompt_ids[rows],
            "prompt_mask": self.prompt_mask[rows],
            "resp_ids": out.tokens,
            "resp_mask": out.mask,
            "lengths": out.mask.sum(-1).astype(np.float32),
            "rewards": rewards,
            "advantages": np.asarray(advantages, np.float32),
        }


# --------------------------------------------------------------------------------------
# The measurement.
# --------------------------------------------------------------------------------------

REFERENCE_STREAM, MEASURE_STREAM = 1, 2
BASELINE = "ΔL α=1"


def measure_policy(
    model: nnx.Module,
    tokenizer: Tokenizer,
    config: ml_collections.ConfigDict,
    aggregators: Sequence[Aggregator],
    *,
    num_batches: int,
    reference_batches: int,
    seed: int = 0,
    chunk_rows: int = 8,
    baseline: str = BASELINE,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Runs the reference and measurement passes (module docstring).

    Uses `config`'s data, rollout, reward and advantage fields. Holds the K estimates of
    every aggregator in host memory (A·K·|θ|·4 bytes: 0.9 GB for 6 aggregators × 64
    batches of the 0.6M-parameter tiny model) for their Gram matrices.

    Returns a JSON-able dict: `settings`, `rollouts`, `reference`, `length_fit` and
    `aggregators`: {name: `EstimateSet.summary()` plus `predicted_total_variance`
    (Σ c_i² v(L_i) with the measured per-length v, averaged over batches),
    `proxy_relative` (the mean of `variance_proxy(...)["relative"]`), and, relative to
    `baseline` (default ΔL α=1, else the first aggregator): `scaled_noise_ratio`,
    `progress_cv_ratio` (with jackknife `_se`), `predicted_scaled_noise_ratio` and
    `proxy_scaled_noise_ratio` (what the independent-rows model and the online proxy
    predict for scaled_noise_ratio)}.
    """
    if num_batches < 3 or reference_batches < 2:
        raise ValueError(
            f"num_batches={num_batches} must be at least 3 and reference_batches="
            f"{reference_batches} at least 2 (variances and their jackknife errors)."
        )
    from deltal_jax import train

    log = log or (lambda _: None)
    graphdef, params = nnx.split(model)
    m_len, temp = config.rollout.max_response_len, config.rollout.temperature
    records, _ = train.load_records(config)
    seen = {"rewards": [], "lengths": [], "zero_adv": []}
    with RewardPool(config.reward.num_workers) as pool:
        source = RolloutSource(graphdef, params, tokenizer, config, records, pool, seed)

        def draw(stream, index):
            """A rollout batch (recorded in `seen`) and its per-response scores s_i."""
            batch = source.draw(stream, index)
            seen["rewards"].append(batch["rewards"])
            seen["lengths"].append(batch["lengths"])
            seen["zero_adv"].append(batch["advantages"] == 0)
            scores = per_response_scores(
                graphdef, params, batch["prompt_ids"], batch["prompt_mask"], batch["resp_ids"],
                batch["resp_mask"], temperature=temp, chunk_rows=chunk_rows,
            )  # fmt: skip
            return batch, scores

        reference = RunningMean()
        for k in range(reference_batches):
            batch, scores = draw(REFERENCE_STREAM, k)
            reference.add(np.asarray(_mean_gradient(scores, jnp.asarray(batch["advantages"]))))
            if (k + 1) % 64 == 0 or k + 1 == reference_batches:
                log(f"reference batch {k + 1}/{reference_batches}")
        r = reference.mean
        r_signal_sq = reference.mean_norm_sq()
        r_signal = float(np.sqrt(r_signal_sq)) if r_signal_sq > 0 else float("nan")
        r_dev = jnp.asarray(r, jnp.float32)

        estimates = np.zeros((len(aggregators), num_batches, r.size), np.float32)
        coef_sums = np.zeros((len(aggregators), num_batches))
        per_row = {"lengths": [], "advantages": [], "score_sq": [], "grad_dot_ref": [],
                   "grad_dev": []}  # fmt: skip
        proxies = np.zeros((num_batches, len(aggregators)))
        for k in range(num_batches):
            batch, scores = draw(MEASURE_STREAM, k)
            lengths, adv = jnp.asarray(batch["lengths"]), jnp.asarray(batch["advantages"])
            coef = coefficient_matrix(aggregators, lengths, m_len)  # [A, N]
            est, s_sq, g_dot_r, g_dev = jax.device_get(_batch_reductions(scores, adv, coef, r_dev))
            estimates[:, k], coef_sums[:, k] = est, np.asarray(coef.sum(-1))
            proxies[k] = [float(variance_proxy(c, lengths, adv)["relative"]) for c in coef]
            for name, value in (("lengths", batch["lengths"]), ("advantages", batch["advantages"]),
                                ("score_sq", s_sq), ("grad_dot_ref", g_dot_r),
                                ("grad_dev", g_dev)):  # fmt: skip
                per_row[name].append(np.asarray(value, np.float64))
            if (k + 1) % 8 == 0 or k + 1 == num_batches:
                log(f"measurement batch {k + 1}/{num_batches}")

    rows = {k: np.stack(v) for k, v in per_row.items()}  # [K, N] each
    fits = {
        "gradient": fit_length_exponent(rows["lengths"], rows["grad_dev"]),
        "score": fit_length_exponent(rows["lengths"], rows["score_sq"]),
        "advantage_sq": fit_length_exponent(rows["lengths"], rows["advantages"] ** 2),
        # E[g_i | L]·E r / ‖E r‖²: 1 at every length if E[g_i | L] = μ (the paper's model).
        "signal": fit_length_exponent(rows["lengths"], rows["grad_dot_ref"] / r_signal**2),
    }
    # v(L): the per-length mean of ‖g_i − r‖², looked up for every measured row.
    per_length = dict(zip(fits["gradient"]["lengths"], fits["gradient"]["means"], strict=True))
    v_rows = np.vectorize(lambda x: per_length[int(round(x))])(rows["lengths"])  # [K, N]
    sets, results = {}, {}
    for j, a in enumerate(aggregators):
        sets[a.name] = EstimateSet.from_estimates(estimates[j], coef_sums[j], r, r_signal)
        coef = np.asarray(jax.vmap(lambda lens, a=a: a.coefficients(lens, m_len))(
            jnp.asarray(rows["lengths"])), np.float64)  # fmt: skip
        results[a.name] = {
            "mode": a.mode,
            "alpha": a.alpha,
            "unbiased": a.unbiased,
            **sets[a.name].summary(),
            "predicted_total_variance": float(np.mean(np.sum(coef**2 * v_rows, -1))),
            "proxy_relative": float(proxies[:, j].mean()),
        }
    del estimates
    base = baseline if baseline in results else aggregators[0].name
    b = results[base]
    for name, s in results.items():
        for figure in ("scaled_noise", "progress_cv"):
            s[f"{figure}_ratio"], s[f"{figure}_ratio_se"] = sets[name].ratio_to(sets[base], figure)
        predicted = lambda x: np.sqrt(x["predicted_total_variance"]) / x["coef_sum_mean"]
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero advantages: NaN
            s["predicted_scaled_noise_ratio"] = float(np.float64(predicted(s)) / predicted(b))
            s["proxy_scaled_noise_ratio"] = float(
                np.sqrt(np.float64(s["proxy_relative"]) / b["proxy_relative"])
            )

    lengths_all = np.concatenate(seen["lengths"])
    return {
        "settings": {
            "prompts_per_step": config.rollout.prompts_per_step,
            "group_size": config.rollout.group_size,
            "max_response_len": m_len,
            "temperature": temp,
            "advantage_estimator": config.advantage.estimator,
            "num_batches": num_batches,
            "reference_batches": reference_batches,
            "seed": seed,
            "num_params": int(r.size),
            "baseline": base,
        },
        "rollouts": {
            "mean_reward": float(np.mean(np.concatenate(seen["rewards"]))),
            "zero_advantage_fraction": float(np.mean(np.concatenate(seen["zero_adv"]))),
            "length_mean": float(lengths_all.mean()),
            "length_min": float(lengths_all.min()),
            "length_max": float(lengths_all.max()),
            "length_harmonic_mean": float(1.0 / np.mean(1.0 / np.maximum(lengths_all, 1.0))),
        },
        "reference": {
            "description": "r = mean over the reference batches of M x the Dr. GRPO update",
            "norm": float(np.linalg.norm(r)),
            "signal_norm": r_signal,
            "relative_error": float(
                np.sqrt(reference.total_variance() / reference_batches) / r_signal
            ),  # fmt: skip
            "single_batch_cv": float(np.sqrt(reference.total_variance()) / r_signal),
        },
        "aggregators": results,
        "length_fit": fits,
    }


# --------------------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------------------


def _pm(value: float, se: float, fmt: str = ".3f") -> str:
    return f"{value:{fmt}} ± {se:{fmt}}"


def format_report(result: dict[str, Any]) -> str:
    """Markdown: settings, the per-aggregator table, the ratios to the baseline with what
    the variance models predict for them, and the length dependence."""
    st, ro, ref = result["settings"], result["rollouts"], result["reference"]
    m, base, aggs = st["max_response_len"], st["baseline"], result["aggregators"]
    lines = [
        f"B = {st['prompts_per_step']} prompts × G = {st['group_size']} responses, "
        f"M = {m}, temperature {st['temperature']}, {st['advantage_estimator']} advantages; "
        f"K = {st['num_batches']} measured batches, R = {st['reference_batches']} reference "
        f"batches; |θ| = {st['num_params']:,}.",
        "",
        f"Rollouts: mean reward {ro['mean_reward']:.3f}, zero-advantage rows "
        f"{ro['zero_advantage_fraction']:.1%}, lengths {ro['length_min']:.0f}–"
        f"{ro['length_max']:.0f} (mean {ro['length_mean']:.2f}, harmonic "
        f"{ro['length_harmonic_mean']:.2f}).",
        "",
        f"Reference r: ‖E r‖ ≈ {ref['signal_norm']:.4g} (‖r‖ = {ref['norm']:.4g}), relative "
        f"standard error {ref['relative_error']:.3f}; one Dr. GRPO batch alone has CV "
        f"{ref['single_batch_cv']:.2f}.",
        "",
        "Estimates ĝ scaled by M (so Σc·M = 1 for Dr. GRPO and ΔL); ± are jackknife "
        "standard errors over the K batches.",
        "",
        "| aggregator | Σc·M (mean ± sd) | tr Cov ĝ·M² | ‖E ĝ‖·M | CV | progress along r ·M "
        "| CV along r | cos(ĝ_k, r) (mean ± sd) | cos(mean ĝ, r) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in aggs.items():
        lines.append(
            f"| {name} | {_pm(s['coef_sum_mean'] * m, s['coef_sum_std'] * m, '.4f')} "
            f"| {_pm(s['total_variance'] * m * m, s['total_variance_se'] * m * m, '.4g')} "
            f"| {s['signal_norm'] * m:.3g} | {_pm(s['cv'], s['cv_se'], '.2f')} "
            f"| {s['progress'] * m:.4g} | {_pm(s['progress_cv'], s['progress_cv_se'], '.2f')} "
            f"| {_pm(s['cos_mean'], s['cos_std'], '.4f')} | {s['cos_of_mean']:.4f} |"
        )
    lines += [
        "",
        f"Relative to {base}. Scaled noise = sqrt(tr Cov ĝ) / mean Σc, the CV if every "
        "response had the same mean gradient (the paper's model); measured, then as "
        "predicted by independent rows with the measured per-length variance "
        "(Σ c_i² v(L_i)), and by the online proxy (Σ c_i² A_i² L_i). Last column: the "
        "measured CV along r, which also counts how far E ĝ tilts away from r.",
        "",
        "| aggregator | scaled noise | independent rows | online proxy | CV along r |",
        "|---|---|---|---|---|",
    ]
    for name, s in aggs.items():
        lines.append(
            f"| {name} | {_pm(s['scaled_noise_ratio'], s['scaled_noise_ratio_se'], '.4f')} "
            f"| {s['predicted_scaled_noise_ratio']:.4f} | {s['proxy_scaled_noise_ratio']:.4f} "
            f"| {_pm(s['progress_cv_ratio'], s['progress_cv_ratio_se'], '.4f')} |"
        )
    fits = result["length_fit"]
    lines += ["", "Length dependence, a weighted fit of E[value | L] ∝ L^β (the paper "
              "assumes β = 1 for the per-response variance):", "",
              "| value | β ± se |", "|---|---|"]  # fmt: skip
    labels = {"gradient": "‖g_i − r‖², g_i = A_i s_i", "score": "‖s_i‖², s_i = Σ_t ∇log π",
              "advantage_sq": "A_i²"}  # fmt: skip
    for key, label in labels.items():
        lines.append(f"| {label} | {_pm(fits[key]['exponent'], fits[key]['exponent_se'])} |")
    lines += ["", "Per length (the signal column is E[g_i·r] / ‖E r‖², 1 at every length under "
              "the paper's model):", "",
              "| L | responses | mean ‖g_i − r‖² | mean ‖s_i‖² | mean A_i² | signal |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for i, n in enumerate(fits["gradient"]["lengths"]):
        lines.append(
            f"| {n} | {fits['gradient']['counts'][i]} | {fits['gradient']['means'][i]:.4g} "
            f"| {fits['score']['means'][i]:.4g} | {fits['advantage_sq']['means'][i]:.3f} "
            f"| {fits['signal']['means'][i]:.3f} |"
        )
    return "\n".join(lines)


def plot_report(result: dict[str, Any]):
    """A matplotlib Figure of two panels: the per-length mean of ‖g_i − r‖² and ‖s_i‖²
    against L (log-log; marker area ∝ number of responses; the fitted power law, and
    β = 1 dotted through the fit at the most common length); the scaled noise of each
    aggregator relative to the baseline with its standard error, and the independent-rows
    prediction."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("gradient", "‖g_i − r‖²"), ("score", "‖s_i‖²")):
        f = result["length_fit"][key]
        lens, means = np.asarray(f["lengths"], float), np.asarray(f["means"])
        counts = np.asarray(f["counts"])
        keep = (counts >= 2) & (means > 0) & (lens > 0)
        if not keep.any():
            continue
        x, y, n = lens[keep], means[keep], counts[keep]
        sizes = 200 * np.sqrt(n / n.max())
        scatter = ax1.scatter(x, y, s=sizes, alpha=0.6, label=f"{label}: β = {f['exponent']:.2f}")
        if np.isfinite(f["exponent"]):
            color = scatter.get_facecolor()[0][:3]
            fitted = f["scale"] * x ** f["exponent"]
            ax1.plot(x, fitted, "-", color=color)
            anchor = np.argmax(n)
            ax1.plot(x, fitted[anchor] * x / x[anchor], ":", color=color)
    ax1.set(xscale="log", yscale="log", xlabel="response length L",
            ylabel="mean over responses of length L",
            title="per-response variance vs length (dotted: β = 1)")  # fmt: skip
    ax1.legend(fontsize=8)
    aggs = result["aggregators"]
    names = list(aggs)
    ratios = np.asarray([aggs[n]["scaled_noise_ratio"] for n in names])
    errors = np.asarray([aggs[n]["scaled_noise_ratio_se"] for n in names])
    predicted = np.asarray([aggs[n]["predicted_scaled_noise_ratio"] for n in names])
    colors = ["C0" if aggs[n]["unbiased"] else "C3" for n in names]
    ax2.bar(range(len(names)), ratios, yerr=errors, color=colors, capsize=3)
    ax2.scatter(range(len(names)), predicted, marker="D", color="k", zorder=3,
                label="predicted: independent rows")  # fmt: skip
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right")
    shown = np.concatenate([ratios - errors, ratios + errors, predicted])
    shown = shown[np.isfinite(shown)]
    if shown.size:
        pad = 0.1 * max(shown.max() - shown.min(), 0.01)
        ax2.set_ylim(shown.min() - pad, shown.max() + pad)
    ax2.legend(fontsize=8)
    ax2.set(ylabel=f"sqrt(tr Cov ĝ) / mean Σc, ÷ {result['settings']['baseline']}",
            title="scaled noise (blue: Σc = 1/M; red: length-dependent)")  # fmt: skip
    fig.tight_layout()
    return fig
