"""Advantage estimators: identity 6 of ALGORITHMS.md §9, NumPy references, SPO, DAPO shaping."""

import functools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from deltal_jax import advantages as adv

binary_batches = st.integers(2, 8).flatmap(
    lambda g: st.tuples(
        st.just(g),
        st.lists(st.integers(0, 1), min_size=g, max_size=6 * g).map(
            lambda xs, g=g: xs[: len(xs) // g * g]
        ),
    )
)
real_batches = st.integers(2, 8).flatmap(
    lambda g: st.tuples(
        st.just(g),
        st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=g, max_size=6 * g).map(
            lambda xs, g=g: xs[: len(xs) // g * g]
        ),
    )
)


@settings(max_examples=25, deadline=None)
@given(real_batches)
def test_rloo_is_scaled_mean_only(batch):
    g, r = batch
    r = jnp.asarray(r, jnp.float32)
    np.testing.assert_allclose(
        adv.rloo(r, g), g / (g - 1) * adv.mean_only(r, g), rtol=1e-4, atol=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(binary_batches)
def test_bnpo_with_uniform_beta_is_mean_only(batch):
    g, r = batch
    r = jnp.asarray(r, jnp.float32)
    params = adv.BetaParams(jnp.float32(1.0), jnp.float32(1.0))
    np.testing.assert_allclose(adv.bnpo(r, g, params=params), adv.mean_only(r, g), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(binary_batches)
def test_bnpo_with_beta_three_halves_is_grpo_up_to_a_constant(batch):
    """f_Beta(p; 3/2, 3/2) = sqrt(p(1−p))/B(3/2, 3/2) and B(3/2, 3/2) = π/8."""
    g, r = batch
    r = jnp.asarray(r, jnp.float32)
    params = adv.BetaParams(jnp.float32(1.5), jnp.float32(1.5))
    want = math.pi / 8 * adv.grpo(r, g, eps=0.0, ddof=0)
    informative = np.repeat(np.asarray(adv.informative_groups(r, g)), g)
    got = adv.bnpo(r, g, params=params)
    np.testing.assert_allclose(got[informative], want[informative], rtol=1e-4)
    np.testing.assert_allclose(got[~informative], 0.0)


@settings(max_examples=25, deadline=None)
@given(real_batches)
def test_stratified_with_one_stratum_is_grpo(batch):
    g, r = batch
    r = jnp.asarray(r, jnp.float32)
    strata = jnp.zeros(r.shape, jnp.int32)
    np.testing.assert_allclose(adv.stratified(r, g, strata), adv.grpo(r, g), rtol=1e-4, atol=1e-4)


def test_grpo_matches_numpy_with_unbiased_std():
    r = np.array([1, 0, 0, 1, 1, 1, 0.5, 0.2], np.float32)
    groups = r.reshape(2, 4)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(adv.grpo(jnp.asarray(r), 4), want.ravel(), rtol=1e-5)
    # jnp.std's default ddof = 0 would give a different answer: the option matters.
    biased = adv.grpo(jnp.asarray(r), 4, ddof=0)
    assert not np.allclose(biased, want.ravel(), rtol=1e-3)


def test_grpo_singleton_group_keeps_the_reward():
    r = jnp.asarray([0.0, 1.0, 0.3])
    np.testing.assert_allclose(adv.grpo(r, 1), r)


def test_grpo_all_equal_group_is_zero_not_nan():
    a = adv.grpo(jnp.asarray([1.0, 1.0, 1.0, 1.0]), 4)
    np.testing.assert_array_equal(a, 0.0)


def test_reinforce_pp_baseline_is_whitened_over_the_batch():
    rng = np.random.default_rng(0)
    r = jnp.asarray(rng.normal(size=16), jnp.float32)
    a = np.asarray(adv.reinforce_pp_baseline(r, 4))
    centred = np.asarray(adv.mean_only(r, 4))
    np.testing.assert_allclose(a, (centred - centred.mean()) / (centred.std() + 1e-6), rtol=1e-4)


def test_bnpo_moment_fit_matches_formula():
    p_hat = np.array([0.1, 0.4, 0.5, 0.8, 0.3])
    m, v = p_hat.mean(), p_hat.var(ddof=1)
    k = m * (1 - m) / v - 1
    params = adv.bnpo_beta_params(jnp.asarray(p_hat, jnp.float32))
    np.testing.assert_allclose(params.alpha, max(1 + k * m / 3, 1), rtol=1e-5)
    np.testing.assert_allclose(params.beta, max(1 + k * (1 - m) / 3, 1), rtol=1e-5)


def test_bnpo_is_finite_for_all_zero_and_all_one_groups():
    r = jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1], jnp.float32)
    a = adv.bnpo(r, 4)
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a[:8], 0.0)
    # The informative group keeps the sign of R − p̂.
    assert np.all(np.sign(a[8:]) == np.sign(np.asarray(r[8:]) - 0.5))


def test_bnpo_multiple_components_average_their_advantages():
    r = jnp.asarray([[1, 0], [0, 0], [1, 1], [0, 1]], jnp.float32)
    both = adv.bnpo(r, 2)
    want = (adv.bnpo(r[:, 0], 2) + adv.bnpo(r[:, 1], 2)) / 2
    np.testing.assert_allclose(both, want, rtol=1e-6)


def test_stratified_normalises_within_strata_and_blends():
    r = jnp.asarray([1.0, 0.0, 1.0, 0.0, 0.3, 0.9], jnp.float32)
    strata = jnp.asarray([0, 0, 1, 1, 1, 2])  # one group of 6: strata sizes 2, 3, 1
    san = np.asarray(adv.stratified(r, 6, strata, eps=0.0))
    s0 = np.array([1.0, 0.0])
    s1 = np.array([1.0, 0.0, 0.3])
    np.testing.assert_allclose(san[:2], (s0 - s0.mean()) / s0.std(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(san[2:5], (s1 - s1.mean()) / s1.std(ddof=1), rtol=1e-5)
    assert san[5] == 0.0  # singleton stratum
    blended = adv.stratified(r, 6, strata, blend=0.25, eps=0.0)
    np.testing.assert_allclose(
        blended, 0.25 * san + 0.75 * np.asarray(adv.grpo(r, 6, eps=0.0)), rtol=1e-5
    )


def test_spo_tracker_reads_baseline_then_updates():
    state = adv.spo_init(4, alpha0=1.0, beta0=1.0)
    ids = jnp.asarray([2, 0])
    rewards = jnp.asarray([1.0, 0.0])
    np.testing.assert_allclose(adv.spo_baseline(state, ids), [0.5, 0.5])
    rho = adv.spo_discount()  # constant variant
    new = adv.spo_update(state, ids, rewards, rho)
    np.testing.assert_allclose(new.alpha, [0.875, 1.0, 1.875, 1.0])
    np.testing.assert_allclose(new.beta, [1.875, 1.0, 0.875, 1.0])
    np.testing.assert_allclose(adv.spo_baseline(new, ids), [1.875 / 2.75, 0.875 / 2.75])
    probs = adv.spo_sampling_probs(new)
    p = np.asarray(new.alpha / (new.alpha + new.beta))
    w = np.sqrt(p * (1 - p)) + 0.05
    np.testing.assert_allclose(probs, w / w.sum(), rtol=1e-6)
    # Uncertain prompts (p̂ = 0.5) are sampled more than ones it has learned about.
    assert probs[1] > probs[0]


def test_spo_discount_follows_policy_drift_and_is_clipped():
    stored = jnp.zeros((3, 4))
    mask = jnp.ones((3, 4))
    moved = jnp.asarray([[0.0] * 4, [0.006] * 4, [1.0] * 4])
    rho = adv.spo_discount(stored, moved, mask)
    np.testing.assert_allclose(rho, [0.96, 2**-0.1, 0.875], rtol=1e-5)


def test_spo_advantages_are_normalised_over_the_batch():
    r = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    base = jnp.asarray([0.2, 0.5, 0.9, 0.5])
    a = np.asarray(adv.spo_advantages(r, base))
    np.testing.assert_allclose(a.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(a.std(), 1.0, rtol=1e-4)
    raw = np.asarray(r - base)
    np.testing.assert_allclose(a, (raw - raw.mean()) / (raw.std() + 1e-6), rtol=1e-5)


def test_batch_statistics_under_pmap_equal_global_ones():
    rng = np.random.default_rng(3)
    r = jnp.asarray(rng.integers(0, 2, size=64), jnp.float32)
    want_rpp = adv.reinforce_pp_baseline(r, 4)
    want_bnpo = adv.bnpo(r, 4)
    fn = jax.pmap(
        lambda x: (
            adv.reinforce_pp_baseline(x, 4, axis_name="i"),
            adv.bnpo(x, 4, axis_name="i"),
        ),
        axis_name="i",
    )
    got_rpp, got_bnpo = fn(r.reshape(8, 8))
    np.testing.assert_allclose(got_rpp.reshape(-1), want_rpp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_bnpo.reshape(-1), want_bnpo, rtol=1e-5, atol=1e-6)


def test_informative_groups_flags_groups_with_reward_spread():
    r = jnp.asarray([1, 1, 1, 0, 0, 0, 0.5, 0.5, 0.5, 1, 0, 1], jnp.float32)
    assert adv.informative_groups(r, 3).tolist() == [False, False, False, True]


def test_soft_overlong_punishment_in_tokens():
    lengths = jnp.asarray([10, 12, 13, 16, 20, 21])
    got = adv.soft_overlong_punishment(lengths, max_response_len=20, cache_len=8, factor=1.0)
    # M − L_cache = 12: no penalty up to 12 tokens, linear to −1 at M.
    np.testing.assert_allclose(got, [0, 0, -1 / 8, -4 / 8, -1, -1], rtol=1e-6)


def test_overlong_filter_zeroes_truncated():
    a = adv.overlong_filter(jnp.asarray([1.0, -2.0, 3.0]), jnp.asarray([False, True, False]))
    np.testing.assert_array_equal(a, [1.0, 0.0, 3.0])


@pytest.mark.parametrize(
    "call,match",
    [
        (
            functools.partial(adv.compute, "ppo"),
            "Unknown advantage estimator 'ppo'. Accepted: grpo",
        ),
        (functools.partial(adv.compute, "grpo", group_size=3), "positive divisor"),
        (functools.partial(adv.compute, "rloo", group_size=1), "rloo needs group_size >= 2"),
        (functools.partial(adv.compute, "stratified"), "needs `strata`"),
        (functools.partial(adv.compute, "spo"), "needs `spo_baseline_values`"),
    ],
)
def test_bad_estimator_settings(call, match):
    kwargs = {} if "group_size" in call.keywords else {"group_size": 4}
    with pytest.raises(ValueError, match=match):
        call(jnp.zeros(8), **kwargs)


def test_soft_overlong_rejects_bad_cache():
    with pytest.raises(ValueError, match="cache_len must be in"):
        adv.soft_overlong_punishment(jnp.ones(2), max_response_len=8, cache_len=9)
