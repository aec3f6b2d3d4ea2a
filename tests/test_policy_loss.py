"""Clipped surrogate, dual clip and GSPO against NumPy references and gradient identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltal_jax import aggregation as agg
from deltal_jax.policy_loss import clipped_surrogate, entropy_bonus, gspo_log_ratio


def numpy_ppo_loss(logp, old_logp, adv, eps_low, eps_high, c):
    """Per-token PPO loss written out case by case, as in ALGORITHMS.md §0."""
    out = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        a = adv[idx[0]]
        rho = np.exp(np.clip(logp[idx] - old_logp[idx], -20, 20))
        s = min(rho * a, np.clip(rho, 1 - eps_low, 1 + eps_high) * a)
        loss = -s
        if c is not None and a < 0:
            loss = min(loss, -c * a)
        out[idx] = loss
    return out


@pytest.mark.parametrize("c", [None, 3.0])
def test_ppo_loss_matches_numpy(c):
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.01, 1, (6, 9))).astype(np.float32)
    old = (logp + rng.normal(0, 1.0, logp.shape)).astype(np.float32)  # ratios far from 1
    adv = rng.normal(size=6).astype(np.float32)
    mask = np.ones_like(logp)
    out = clipped_surrogate(
        jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
        eps_low=0.2, eps_high=0.28, clip_ratio_c=c,
    )  # fmt: skip
    want = numpy_ppo_loss(logp, old, adv, 0.2, 0.28, c)
    np.testing.assert_allclose(out.loss, want, rtol=1e-5, atol=1e-6)
    if c is not None:
        ratio = np.exp(logp - old)
        assert np.array_equal(out.dual_clipped, (adv[:, None] < 0) & (ratio > c))
        assert out.dual_clipped.any()


def test_clip_indicators_and_zero_gradient_where_clipped():
    logp = jnp.log(jnp.asarray([[0.5, 0.5, 0.5, 0.5]]))
    # ratios 0.5, 0.9, 1.1, 2.0
    old = logp - jnp.log(jnp.asarray([[0.5, 0.9, 1.1, 2.0]]))
    mask = jnp.ones_like(logp)
    for a, low, high in [(1.0, [0, 0, 0, 0], [0, 0, 0, 1]), (-1.0, [1, 0, 0, 0], [0, 0, 0, 0])]:
        adv = jnp.asarray([a])
        out = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
        assert out.clipped_low.astype(int).tolist() == [low]
        assert out.clipped_high.astype(int).tolist() == [high]
        grad = jax.grad(
            lambda lp, adv=adv: clipped_surrogate(
                lp, old, adv, mask, eps_low=0.2, eps_high=0.28
            ).loss.sum()
        )(logp)
        clipped = np.asarray(out.clipped_low | out.clipped_high)
        # d(−ρÂ)/dℓ = −ρÂ where the clip is inactive, exactly 0 where it is active.
        want = np.where(clipped, 0.0, -np.asarray(out.ratio) * a)
        np.testing.assert_allclose(grad, want, rtol=1e-6)


def test_on_policy_gradient_is_advantage_weighted_score():
    """At ρ = 1 the surrogate's gradient is −Â·∇ℓ for every variant."""
    rng = np.random.default_rng(1)
    logp = jnp.asarray(np.log(rng.uniform(0.05, 1, (4, 7))), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [3], [5], [1]]), jnp.float32)
    adv = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    for variant in ("ppo", "gspo-token"):
        grad = jax.grad(
            lambda lp, v=variant: jnp.sum(
                clipped_surrogate(lp, lp, adv, mask, variant=v).loss * mask
            )
        )(logp)
        np.testing.assert_allclose(grad, -adv[:, None] * mask, rtol=1e-6)


def test_gspo_sequence_ratio_and_token_variant_share_value_and_gradient():
    rng = np.random.default_rng(2)
    logp = jnp.asarray(np.log(rng.uniform(0.05, 1, (5, 8))), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.3, (5, 8)), jnp.float32)
    lengths = np.array([8, 3, 5, 1, 6])
    mask = jnp.asarray(np.arange(8)[None] < lengths[:, None], jnp.float32)
    seq = gspo_log_ratio(logp, old, mask, token_level=False)
    want = np.sum(np.where(mask, logp - old, 0), -1) / lengths
    np.testing.assert_allclose(seq[:, 0], want, rtol=1e-5)
    np.testing.assert_allclose(gspo_log_ratio(logp, old, mask, token_level=True), seq, rtol=1e-6)

    adv = jnp.asarray([1.0, -1.0, 0.5, 2.0, -0.3])
    coef = agg.response_coefficients(
        agg.response_lengths(mask), mode="seq-mean-token-mean", max_response_len=8
    )

    def loss(lp, variant):
        out = clipped_surrogate(lp, old, adv, mask, eps_low=3e-4, eps_high=4e-4, variant=variant)
        return agg.aggregate(out.loss, mask, coef)

    g_seq = jax.grad(loss)(logp, "gspo")
    g_tok = jax.grad(loss)(logp, "gspo-token")
    np.testing.assert_allclose(g_seq, g_tok, rtol=1e-5, atol=1e-8)
    # With seq-mean-token-mean the aggregated loss is GSPO's mean over sequences of
    # −min(s_i Â_i, clip(s_i) Â_i).
    s = np.exp(want)
    per_seq = -np.minimum(s * adv, np.clip(s, 1 - 3e-4, 1 + 4e-4) * adv)
    np.testing.assert_allclose(loss(logp, "gspo"), per_seq.mean(), rtol=1e-5)


def test_entropy_bonus_lowers_loss_for_higher_entropy():
    h = jnp.asarray([[0.1, 2.0]])
    np.testing.assert_allclose(entropy_bonus(h, 0.01), [[-0.001, -0.02]], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="trpo"), "Unknown policy-loss variant 'trpo'"),
        (dict(eps_low=-0.1), "clip epsilons must be >= 0"),
        (dict(clip_ratio_c=0.5), "clip_ratio_c must be > 1"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=match):
        clipped_surrogate(x, x, jnp.zeros(2), jnp.ones((2, 3)), **kwargs)


def test_mismatched_shapes_are_rejected():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="must match"):
        clipped_surrogate(x, jnp.zeros((2, 4)), jnp.zeros(2), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"advantages \(3,\) must be \[N\] or \[N, T\]"):
        clipped_surrogate(x, x, jnp.zeros(3), jnp.ones((2, 3)))
