"""KL estimators, clamps, placements, status table (the statistics are in another file)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltal_jax import kl


def test_estimators_match_numpy():
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.01, 1, (3, 5)))
    ref = np.log(rng.uniform(0.01, 1, (3, 5)))
    log_r = ref - logp
    want = {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": np.clip(np.exp(log_r) - 1 - log_r, -10, 10),
    }
    for name, value in want.items():
        got = kl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), name)
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6)


def test_estimators_are_nonnegative_where_theory_says_and_mean_to_the_kl():
    """Under π, E[k1] = E[k3] = KL(π ‖ π_ref) exactly; k2 and k3 are ≥ 0 pointwise."""
    p = jnp.asarray([0.5, 0.3, 0.2])
    q = jnp.asarray([0.2, 0.2, 0.6])
    exact = float(jnp.sum(p * jnp.log(p / q)))
    for name in ("k1", "k3"):
        k = kl.kl_per_token(jnp.log(p), jnp.log(q), name)
        np.testing.assert_allclose(jnp.sum(p * k), exact, rtol=1e-5)
    for name in ("k2", "k3"):
        assert np.all(np.asarray(kl.kl_per_token(jnp.log(p), jnp.log(q), name)) >= 0)


def test_clamps_keep_extreme_log_ratios_finite():
    logp = jnp.asarray([[0.0, -100.0]])
    ref = jnp.asarray([[-100.0, 0.0]])
    for name in kl.ESTIMATORS:
        assert np.all(np.isfinite(kl.kl_per_token(logp, ref, name)))
    np.testing.assert_allclose(kl.kl_per_token(logp, ref, "k1"), [[20.0, -20.0]])
    np.testing.assert_allclose(kl.kl_per_token(logp, ref, "k3"), [[10.0, 10.0]])  # 19 and e^20


def test_reward_penalty_sums_masked_tokens_without_gradient():
    logp = jnp.log(jnp.asarray([[0.5, 0.25, 0.9]]))
    ref = jnp.log(jnp.asarray([[0.25, 0.25, 0.1]]))
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    pen = kl.reward_penalty(logp, ref, mask, estimator="k1", beta=0.1)
    np.testing.assert_allclose(pen, [0.1 * np.log(2.0)], rtol=1e-6)
    grad = jax.grad(lambda lp: kl.reward_penalty(lp, ref, mask, estimator="k1", beta=0.1).sum())(
        logp
    )
    np.testing.assert_array_equal(grad, 0.0)


def test_loss_term_gradients():
    logp = jnp.log(jnp.asarray([[0.5, 0.2]]))
    ref = jnp.log(jnp.asarray([[0.25, 0.4]]))
    r = np.exp(np.asarray(ref - logp))
    # ∇k1 = ∇ℓ; ∇k3 = (1 − r)∇ℓ.
    for name, want in [("k1", np.ones_like(r)), ("k3", 1 - r)]:
        g = jax.grad(lambda lp, n=name: kl.loss_per_token(lp, ref, estimator=n, beta=1.0).sum())(
            logp
        )
        np.testing.assert_allclose(g, want, rtol=1e-6)
    # ρ·k off-policy: the value is reweighted by π/π_old.
    old = logp - jnp.log(2.0)
    val = kl.loss_per_token(logp, ref, estimator="k3", beta=1.0, old_logp=old)
    np.testing.assert_allclose(val, 2.0 * kl.kl_per_token(logp, ref, "k3"), rtol=1e-6)


def test_every_configuration_has_a_documented_status():
    for est, place, corr in itertools.product(kl.ESTIMATORS, kl.PLACEMENTS, (False, True)):
        if corr and place == "reward":
            with pytest.raises(ValueError, match="off_policy_correction applies to a loss-placed"):
                kl.kl_status(est, place, corr)
            continue
        status = kl.kl_status(est, place, corr)
        assert status.split(":")[0].split(" (")[0] in {
            "unbiased",
            "biased",
            "zero gradient in expectation",
            "no KL regularisation",
        }
    assert kl.kl_status("k1", "reward").startswith("unbiased")
    assert kl.kl_status("k3", "loss").startswith("biased: token-level forward KL")


@pytest.mark.parametrize(
    "args,match",
    [
        (("k4", "loss"), "Unknown KL estimator 'k4'. Accepted: k1, k2, k3"),
        (("k1", "advantage"), "Unknown KL placement 'advantage'. Accepted: none, reward"),
    ],
)
def test_bad_configurations_are_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        kl.validate(*args)
