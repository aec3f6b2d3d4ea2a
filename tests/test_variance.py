"""Gradient-variance diagnostics (deltal_jax.analysis).

Synthetic per-response gradients g_i = μ + σ L_i^(β/2) z_i (z standard normal in P
dimensions) have a known law, so each aggregator's total variance is analytic:

    fixed lengths:  tr Cov ĝ = P σ² Σ_i c_i² L_i^β
    random lengths: tr Cov ĝ = P σ² E[Σ_i c_i² L_i^β] + ‖μ‖² Var(Σ_i c_i)

(the law of total variance; the expectation is taken by enumerating every length
configuration). Tolerances are 5 jackknife standard errors of the recovered figure, and
the jackknife itself is checked against the exact sampling sd in the Gaussian case.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from deltal_jax import aggregation as agg
from deltal_jax.analysis import (
    EstimateSet,
    RunningMean,
    fit_length_exponent,
    parse_aggregators,
    variance_proxy,
    variance_statistics,
)
from deltal_jax.analysis.measure import per_response_scores
from deltal_jax.models import get_preset, init_model, response_logprobs
from deltal_jax.policy_loss import clipped_surrogate

Z = 5.0
M = 64
ALL = parse_aggregators("grpo,dapo,dr_grpo,delta-l:0,delta-l:0.5,delta-l:0.75,delta-l:1")
UNBIASED = ("Dr. GRPO", "ΔL α=0.5", "ΔL α=0.75", "ΔL α=1")


def synthetic_grads(key, lengths, mu, sigma, beta):
    """[K, N, P] g_i = μ + σ L_i^(β/2) z_i for lengths [K, N]."""
    z = jax.random.normal(key, lengths.shape + mu.shape)
    return mu + sigma * (lengths[..., None] ** (beta / 2)) * z


def coefficients(aggregator, lengths):
    return np.asarray(aggregator.coefficients(jnp.asarray(lengths, jnp.float32), M), np.float64)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_fixed_lengths_recover_analytic_total_variance(beta):
    k, p, sigma = 400, 32, 0.7
    lengths = np.asarray([2, 3, 5, 8, 13, 21, 34, 55], np.float32)
    mu = jnp.linspace(-1.0, 1.0, p)
    grads = synthetic_grads(jax.random.key(0), np.broadcast_to(lengths, (k, 8)), mu, sigma, beta)
    stats = variance_statistics(grads, lengths, ALL, max_response_len=M)
    for a in ALL:
        s = stats[a.name].summary()
        c = coefficients(a, lengths)
        expected = p * sigma**2 * np.sum(c**2 * lengths**beta)
        # T̂ ~ expected · χ²_{P(K−1)} / (P(K−1)): its exact sd, which the jackknife must find.
        exact_sd = expected * np.sqrt(2.0 / (p * (k - 1)))
        assert abs(s["total_variance"] - expected) <= Z * exact_sd, (a.name, s, expected)
        assert s["total_variance_se"] == pytest.approx(exact_sd, rel=0.3)
        np.testing.assert_allclose(s["coef_sum_mean"], c.sum(), rtol=1e-6)
        assert s["coef_sum_std"] < 1e-6 * c.sum()
        # ‖E ĝ‖ = Σc ‖μ‖ through the unbiased (off-diagonal Gram) estimate.
        signal = c.sum() * float(jnp.linalg.norm(mu))
        assert s["signal_norm"] == pytest.approx(signal, rel=0.03)


def test_random_lengths_recover_law_of_total_variance():
    k, n, p, sigma, beta = 3000, 3, 16, 0.5, 1.0
    values, probs = np.asarray([2.0, 6.0, 18.0]), np.asarray([0.5, 0.3, 0.2])
    mu = jnp.full((p,), 0.25)
    rng = np.random.default_rng(0)
    lengths = rng.choice(values, size=(k, n), p=probs).astype(np.float32)
    grads = synthetic_grads(jax.random.key(1), lengths, mu, sigma, beta)
    stats = variance_statistics(grads, lengths, ALL, max_response_len=M)
    configs = np.asarray(list(itertools.product(values, repeat=n)))  # every length triple
    weights = np.prod(probs[np.searchsorted(values, configs)], axis=1)
    mu_sq = float(mu @ mu)
    for a in ALL:
        c = np.stack([coefficients(a, lens) for lens in configs])  # [27, N]
        e_noise = np.sum(weights * np.sum(c**2 * configs**beta, 1))
        sums = c.sum(1)
        var_sum = np.sum(weights * sums**2) - np.sum(weights * sums) ** 2
        expected = p * sigma**2 * e_noise + mu_sq * var_sum
        s = stats[a.name].summary()
        assert abs(s["total_variance"] - expected) <= Z * s["total_variance_se"], (a.name, s)
        assert s["total_variance"] == pytest.approx(expected, rel=0.06)
        e_sum = np.sum(weights * sums)
        assert s["signal_norm"] == pytest.approx(e_sum * np.sqrt(mu_sq), rel=0.03)
        if a.unbiased:
            assert var_sum < 1e-12 and s["coef_sum_std"] < 1e-6 / M  # Σc = 1/M always


def test_noise_free_gradients_give_cosine_one_and_cv_from_the_scale_alone():
    k, n, p = 50, 6, 8
    mu = jnp.arange(1.0, p + 1.0)
    lengths = np.random.default_rng(2).integers(1, 40, size=(k, n)).astype(np.float32)
    grads = jnp.broadcast_to(mu, (k, n, p))
    stats = variance_statistics(grads, lengths, ALL, max_response_len=M, reference=2.0 * mu)
    for a in ALL:
        s = stats[a.name].summary()
        np.testing.assert_allclose([s["cos_mean"], s["cos_of_mean"]], 1.0, atol=1e-6)
        assert s["cos_std"] < 1e-6
        sums = np.asarray([coefficients(a, lens).sum() for lens in lengths])
        if a.unbiased:  # every batch gives exactly μ/M
            assert s["cv"] < 1e-3 and s["scaled_noise"] < 1e-3 / float(jnp.linalg.norm(mu))
        else:  # only the scale Σc varies: CV = sd(Σc) / E Σc, with the unbiased (U) E²
            u = (sums.sum() ** 2 - np.sum(sums**2)) / (k * (k - 1))
            assert s["cv"] == pytest.approx(np.std(sums, ddof=1) / np.sqrt(u), rel=1e-3)
            assert s["cv"] > 0.05
    # Fixed lengths: every estimate is identical, for every aggregator.
    fixed = variance_statistics(grads, lengths[0], ALL, max_response_len=M)
    assert max(fixed[a.name].summary()["cv"] for a in ALL) < 1e-3


def test_delta_l_alpha_1_has_least_variance_among_unbiased_under_linear_variance():
    k, n, p = 300, 16, 24
    lengths = np.random.default_rng(3).integers(2, 200, size=(k, n)).astype(np.float32)
    mu = jnp.full((p,), 0.1)
    grads = synthetic_grads(jax.random.key(4), lengths, mu, 1.0, beta=1.0)
    stats = variance_statistics(grads, lengths, ALL, max_response_len=M, reference=mu)
    best = stats["ΔL α=1"]
    variances = [stats[name].summary()["total_variance"] for name in UNBIASED]
    assert variances == sorted(variances, reverse=True)  # Dr. GRPO > α=0.5 > α=0.75 > α=1
    for name in UNBIASED[:-1]:
        ratio, se = stats[name].ratio_to(best, "scaled_noise")
        assert ratio - Z * se > 1.0, (name, ratio, se)
    # GRPO = (M/H)·ΔL(α=1) batch by batch (H: the batch's harmonic mean length), so its
    # Gram matrix is ΔL's rescaled and every cosine to r is the same.
    d = M * np.mean(1.0 / lengths, axis=1)
    scaled = np.outer(d, d) * best.gram
    np.testing.assert_allclose(stats["GRPO"].gram, scaled, rtol=1e-4, atol=1e-6 * scaled.max())
    grpo = stats["GRPO"].summary()
    np.testing.assert_allclose(grpo["cos_mean"], best.summary()["cos_mean"], rtol=1e-5)


def test_ratio_to_is_exact_for_a_rescaled_copy():
    x = np.random.default_rng(5).normal(size=(20, 7)) + 1.0
    sums = np.linspace(1.0, 2.0, 20)
    base = EstimateSet.from_estimates(x, sums, reference=np.ones(7))
    double = EstimateSet.from_estimates(2.0 * x, 2.0 * sums, reference=np.ones(7))
    assert double.ratio_to(base, "scaled_noise") == pytest.approx((1.0, 0.0), abs=1e-9)
    assert double.ratio_to(base, "total_variance") == pytest.approx((4.0, 0.0), abs=1e-9)
    assert double.ratio_to(base, "progress_cv") == pytest.approx((1.0, 0.0), abs=1e-9)
    with pytest.raises(ValueError, match="accepted"):
        double.ratio_to(base, "nope")


def test_running_mean_matches_direct_formulas():
    x = np.random.default_rng(6).normal(size=(9, 5)) + 0.3
    rm = RunningMean()
    for row in x:
        rm.add(row)
    np.testing.assert_allclose(rm.mean, x.mean(0))
    np.testing.assert_allclose(rm.total_variance(), x.var(0, ddof=1).sum())
    gram = x @ x.T
    off_diagonal_mean = (gram.sum() - np.trace(gram)) / (9 * 8)
    np.testing.assert_allclose(rm.mean_norm_sq(), off_diagonal_mean)
    s = EstimateSet.from_estimates(x, np.ones(9)).summary()
    np.testing.assert_allclose(s["total_variance"], rm.total_variance())
    np.testing.assert_allclose(s["signal_norm"] ** 2, rm.mean_norm_sq())


def test_variance_proxy_hand_computed():
    c = jnp.asarray([0.1, 0.2, 0.0])
    lengths = jnp.asarray([2.0, 4.0, 0.0])  # the last row is padding
    a = jnp.asarray([1.0, -2.0, 5.0])
    out = variance_proxy(c, lengths, a)
    proxy = 0.1**2 * 1 * 2 + 0.2**2 * 4 * 4  # Σ c² A² L = 0.66
    np.testing.assert_allclose(out["proxy"], proxy, rtol=1e-6)
    np.testing.assert_allclose(out["relative"], proxy / 0.3**2, rtol=1e-6)
    half = variance_proxy(c, lengths, a, exponent=0.5)["proxy"]
    np.testing.assert_allclose(half, 0.01 * np.sqrt(2) + 0.04 * 4 * 2, rtol=1e-6)
    np.testing.assert_allclose(variance_proxy(c * 0, lengths, a)["relative"], 0.0)
    with pytest.raises(ValueError, match="same shape"):
        variance_proxy(c, lengths[:2], a)


def test_variance_proxy_is_minimised_by_delta_l_with_alpha_equal_to_the_exponent():
    lengths = jnp.asarray(np.random.default_rng(7).integers(1, 500, size=64), jnp.float32)
    ones = jnp.ones_like(lengths)
    alphas = np.round(np.arange(0.0, 1.0001, 0.05), 2)
    for beta in (0.25, 0.5, 1.0):
        proxies = [
            float(variance_proxy(
                agg.response_coefficients(lengths, mode="delta-l", max_response_len=M, alpha=al),
                lengths, ones, exponent=beta,
            )["proxy"])
            for al in alphas
        ]  # fmt: skip
        assert alphas[int(np.argmin(proxies))] == beta
    # Scale-free: GRPO and ΔL α=1 differ by the factor H/M only, so their relative
    # proxies are equal (CV(GRPO) = CV(ΔL α=1) at given lengths).
    rel = {
        a.name: float(variance_proxy(a.coefficients(lengths, M), lengths, ones)["relative"])
        for a in ALL
    }
    assert rel["GRPO"] == pytest.approx(rel["ΔL α=1"], rel=1e-5)
    assert rel["DAPO"] == pytest.approx(rel["Dr. GRPO"], rel=1e-5)
    assert rel["ΔL α=1"] < rel["ΔL α=0.5"] < rel["Dr. GRPO"]


def test_fit_length_exponent_recovers_power_laws():
    lengths = np.repeat(np.arange(2, 40), 5)
    exact = fit_length_exponent(lengths, 3.0 * lengths**0.7)
    assert exact["exponent"] == pytest.approx(0.7, abs=1e-9)
    assert exact["scale"] == pytest.approx(3.0, rel=1e-9)
    rng = np.random.default_rng(8)
    many = rng.integers(2, 60, size=20000)
    noisy = fit_length_exponent(many, many**1.3 * rng.exponential(size=many.size))
    assert abs(noisy["exponent"] - 1.3) <= Z * noisy["exponent_se"] + 1e-3
    assert noisy["exponent_se"] < 0.05
    # A length seen once is reported but left out of the fit.
    lone = fit_length_exponent(np.asarray([2, 2, 3, 3, 50]), np.asarray([2.0, 2, 3, 3, 1e9]))
    assert lone["exponent"] == pytest.approx(1.0) and lone["counts"] == [2, 2, 1]


def test_parse_aggregators():
    names = [a.name for a in parse_aggregators("grpo, dapo,dr_grpo,seq_sum,delta-l:0.75")]
    assert names == ["GRPO", "DAPO", "Dr. GRPO", "seq-mean-token-sum", "ΔL α=0.75"]
    assert [a.unbiased for a in parse_aggregators("grpo,dr_grpo,delta-l:1")] == [
        False,
        True,
        True,
    ]
    for bad in ("delta-l:1.5", "delta-l:x", "gpro", "grpo,grpo"):
        with pytest.raises(ValueError, match="Accepted|twice"):
            parse_aggregators(bad)


def test_per_response_scores_sum_to_the_gradient_of_the_aggregated_loss():
    cfg = get_preset("tiny", vocab_size=13, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=8, mlp_dim=32)  # fmt: skip
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    rng = np.random.default_rng(9)
    n, p_len, m_len = 4, 4, 6
    prompt = jnp.asarray(rng.integers(2, 13, size=(n, p_len)), jnp.int32)
    prompt_mask = jnp.asarray(np.arange(p_len) >= rng.integers(0, 3, size=(n, 1)))  # left pad
    resp = jnp.asarray(rng.integers(2, 13, size=(n, m_len)), jnp.int32)
    lengths = jnp.asarray([6, 3, 1, 0])  # the last row is padding
    resp_mask = jnp.arange(m_len) < lengths[:, None]
    adv = jnp.asarray([1.0, -0.5, 2.0, 0.7])
    coef = agg.response_coefficients(lengths, mode="delta-l", max_response_len=m_len, alpha=0.6)

    scores = per_response_scores(
        graphdef, params, prompt, prompt_mask, resp, resp_mask, chunk_rows=2
    )  # fmt: skip  (2 does not divide 5)

    def aggregated_loss(prm):
        model = nnx.merge(graphdef, prm)
        logp = response_logprobs(model, prompt, prompt_mask, resp, resp_mask).logp
        out = clipped_surrogate(logp, logp, adv, resp_mask)  # ratio 1
        return agg.aggregate(out.loss, resp_mask, coef)

    ascent = -ravel_pytree(jax.jit(jax.grad(aggregated_loss))(params))[0]
    np.testing.assert_allclose((coef * adv) @ scores, ascent, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(scores[3], 0.0)  # an empty response has no score
