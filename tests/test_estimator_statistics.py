"""Identities 4 and 5 of ALGORITHMS.md §9 by Monte Carlo on an enumerable policy.

A tiny autoregressive policy over {EOS, a, b} with maximum length M is small enough that
every sequence can be listed, so the exact objective gradient ∇J and the exact gradient
of the sequence-level reverse KL are known. Batches are drawn from the exact sequence
distribution, and each batch's gradient is computed by the project's own code path
(advantages → coefficients → clipped surrogate → aggregate, or the KL functions).

Tolerances: a component passes when |mean − truth| ≤ Z·se with se = std/sqrt(K) from the
K sampled batches. With Z = 5 a true null fails with probability < 6e-7 per component,
so the few dozen comparisons here are safe; the seeds are fixed anyway. "Biased" claims
require the opposite, a gap of more than Z standard errors.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltal_jax import advantages as adv
from deltal_jax import aggregation as agg
from deltal_jax import kl
from deltal_jax.policy_loss import clipped_surrogate

Z = 5.0
EOS, A_TOKEN = 0, 1


def enumerate_sequences(max_len, min_content=0):
    """Every response over {a, b} of up to M tokens: those that end in EOS within M and
    the truncated ones of exactly M content tokens. Returns tokens/mask [S, M]."""
    tokens, masks = [], []
    for k in range(min_content, max_len + 1):
        for content in itertools.product((1, 2), repeat=k):
            seq = list(content) + ([EOS] if k < max_len else [])
            tokens.append(seq + [EOS] * (max_len - len(seq)))
            masks.append([1.0] * len(seq) + [0.0] * (max_len - len(seq)))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(masks, jnp.float32)


def previous_tokens(tokens):
    """prev[t] = tokens[t−1], with 3 standing for the beginning of the sequence."""
    return jnp.concatenate([jnp.full(tokens.shape[:-1] + (1,), 3), tokens[..., :-1]], -1)


def sample_batches(key, seq_logp, num_batches, batch_size):
    """[K, N] indices of sequences drawn from the exact distribution exp(seq_logp)."""
    return jax.random.categorical(key, seq_logp, shape=(num_batches, batch_size))


def mean_and_se(samples):
    samples = np.asarray(samples, np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


# ---------------------------------------------------------------------------------------
# Identity 4: loss aggregators.
#
# The policy matches the paper's model (ALGORITHMS.md §1): the EOS decision has a fixed
# hazard per position that does not depend on θ or on the content, and the reward is
# decided by the first token. Then E[g_i | L_i] = ∇J for every length, each response's
# gradient noise grows with its number of content tokens, and
# E[Σ c_i g_i] = E[Σ c_i]·∇J: exactly (1/M)·∇J when Σ c_i = 1/M (ΔL, Dr. GRPO), and a
# length-dependent scale otherwise (GRPO, DAPO).
# ---------------------------------------------------------------------------------------

M_AGG = 8
HAZARD = jnp.asarray([0.0, 0.05, 0.1, 0.2, 0.3, 0.3, 0.4, 0.5])  # P(EOS at t | no EOS yet)
THETA_AGG = jnp.asarray([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.0, 0.0]])  # [prev, {a,b}]


def hazard_token_logp(theta, tokens):
    """log π(y_t | y_<t): log h_t for EOS, log(1 − h_t) + log_softmax(θ[prev])[y_t] else."""
    content = jax.nn.log_softmax(theta[previous_tokens(tokens)], -1)  # [..., M, 2]
    picked = jnp.take_along_axis(content, jnp.maximum(tokens - 1, 0)[..., None], -1)[..., 0]
    stop = jnp.log(jnp.maximum(HAZARD, 1e-30))
    return jnp.where(tokens == EOS, stop, jnp.log1p(-HAZARD) + picked)


def aggregator_gradients(mode, alpha, tokens, mask, rewards, group_size):
    """[K, |θ|] ascent directions −∇loss, one per batch ([K, N, M] inputs)."""

    def one_batch(tok, msk, r):
        a = adv.rloo(r, group_size)
        coef = agg.response_coefficients(
            agg.response_lengths(msk), mode=mode, max_response_len=M_AGG, alpha=alpha
        )

        def loss(theta):
            logp = hazard_token_logp(theta, tok)
            out = clipped_surrogate(logp, logp, a, msk)  # on-policy: ρ = 1
            return agg.aggregate(out.loss, msk, coef)

        return -jax.grad(loss)(THETA_AGG).reshape(-1), jnp.sum(coef)

    return jax.jit(jax.vmap(one_batch))(tokens, mask, rewards)


@pytest.fixture(scope="module")
def aggregator_runs():
    tokens, mask = enumerate_sequences(M_AGG, min_content=1)
    rewards = (tokens[:, 0] == A_TOKEN).astype(jnp.float32)

    def objective(theta):
        seq_logp = jnp.sum(hazard_token_logp(theta, tokens) * mask, -1)
        return jnp.sum(jnp.exp(seq_logp) * rewards)

    grad_j = np.asarray(jax.grad(objective)(THETA_AGG)).reshape(-1)
    seq_logp = jnp.sum(hazard_token_logp(THETA_AGG, tokens) * mask, -1)
    np.testing.assert_allclose(jnp.sum(jnp.exp(seq_logp)), 1.0, rtol=1e-5)  # complete list
    idx = sample_batches(jax.random.key(0), seq_logp, num_batches=20000, batch_size=8)
    lengths = mask.sum(-1)
    assert float(lengths.min()) == 2 and float(lengths.max()) == M_AGG  # lengths do vary

    runs = {}
    for name, mode, alpha in [
        ("grpo", "seq-mean-token-mean", 1.0),
        ("dapo", "token-mean", 1.0),
        ("dr_grpo", "seq-mean-token-sum-norm", 1.0),
        ("delta_l_0.5", "delta-l", 0.5),
        ("delta_l_0.75", "delta-l", 0.75),
        ("delta_l_1", "delta-l", 1.0),
    ]:
        g, coef_sum = aggregator_gradients(
            mode, alpha, tokens[idx], mask[idx], rewards[idx], group_size=8
        )
        runs[name] = (np.asarray(g, np.float64), np.asarray(coef_sum, np.float64))
    return grad_j, runs


@pytest.mark.parametrize("name", ["dr_grpo", "delta_l_0.5", "delta_l_0.75", "delta_l_1"])
def test_unbiased_aggregators_estimate_grad_j_over_m(aggregator_runs, name):
    grad_j, runs = aggregator_runs
    g, coef_sum = runs[name]
    np.testing.assert_allclose(coef_sum, 1.0 / M_AGG, rtol=1e-5)
    mean, se = mean_and_se(g)
    target = grad_j / M_AGG
    assert np.all(np.abs(mean - target) <= Z * se + 1e-9), (mean, target, se)
    assert np.max(np.abs(target)) > 20 * np.max(se)  # the test has power to see a bias


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_length_dependent_aggregators_are_biased_by_their_scale(aggregator_runs, name):
    grad_j, runs = aggregator_runs
    g, coef_sum = runs[name]
    mean, se = mean_and_se(g)
    main = np.argmax(np.abs(grad_j))
    # Not (1/M)·∇J ...
    assert abs(mean[main] - grad_j[main] / M_AGG) > Z * se[main]
    # ... but E[Σ c_i]·∇J: the direction is right, the scale depends on the lengths.
    scale = coef_sum.mean()
    assert scale > 1.25 / M_AGG  # mean length is well below M
    assert np.all(np.abs(mean - scale * grad_j) <= Z * se + 1e-9)


def test_delta_l_alpha1_has_the_lowest_variance_among_unbiased(aggregator_runs):
    """Same batches for every aggregator, so the variance differences are sharp; each
    comparison is a paired difference of squared deviations with its own standard error."""
    _, runs = aggregator_runs

    def sq_dev(name):
        g = runs[name][0]
        return np.sum((g - g.mean(0)) ** 2, axis=1)

    best = sq_dev("delta_l_1")
    for other in ["dr_grpo", "delta_l_0.5", "delta_l_0.75"]:
        diff = best - sq_dev(other)
        mean, se = mean_and_se(diff)
        assert mean < -Z * se, (other, mean, se)
    # and the variance falls as α rises towards 1
    variances = [sq_dev(n).mean() for n in ["dr_grpo", "delta_l_0.5", "delta_l_0.75", "delta_l_1"]]
    assert variances == sorted(variances, reverse=True)


# ---------------------------------------------------------------------------------------
# Identity 5: KL configurations against the exact gradient of the sequence-level reverse
# KL(π_θ ‖ π_ref) = Σ_y π_θ(y) log(π_θ(y)/π_ref(y)). Here EOS is trainable too.
# ---------------------------------------------------------------------------------------

M_KL = 4
BETA = 0.5


def table_token_logp(theta, tokens):
    """log π(y_t | y_<t) with logits θ[t, prev] over {EOS, a, b}: a general tabular policy."""
    logits = theta[jnp.arange(tokens.shape[-1]), previous_tokens(tokens)]  # [..., M, 3]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def kl_problem():
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(0, 0.7, (M_KL, 4, 3)), jnp.float32)
    theta_ref = jnp.asarray(rng.normal(0, 0.7, (M_KL, 4, 3)), jnp.float32)
    tokens, mask = enumerate_sequences(M_KL)

    def seq_logp(th):
        return jnp.sum(table_token_logp(th, tokens) * mask, -1)

    # Truncated sequences of M content tokens have no EOS step, so the listed sequences'
    # probabilities sum to one.
    np.testing.assert_allclose(jnp.sum(jnp.exp(seq_logp(theta))), 1.0, rtol=1e-5)

    def exact_kl(th):
        lp = seq_logp(th)
        return jnp.sum(jnp.exp(lp) * (lp - seq_logp(theta_ref)))

    grad_kl = np.asarray(jax.grad(exact_kl)(theta)).reshape(-1)
    idx = sample_batches(jax.random.key(1), seq_logp(theta), num_batches=20000, batch_size=4)
    return theta, theta_ref, tokens[idx], mask[idx], grad_kl


def kl_gradients(problem, estimator, placement, correction=False):
    """[K, |θ|] gradients of the KL part of the loss for one configuration."""
    theta, theta_ref, tokens, mask, _ = problem

    def one_batch(tok, msk):
        ref_logp = table_token_logp(theta_ref, tok)
        sampled_logp = table_token_logp(theta, tok)
        coef = agg.response_coefficients(
            agg.response_lengths(msk), mode="seq-mean-token-sum", max_response_len=M_KL
        )
        reward = jnp.zeros(tok.shape[0])
        if placement in ("reward", "both"):
            reward -= kl.reward_penalty(sampled_logp, ref_logp, msk, estimator=estimator, beta=BETA)

        def loss(th):
            logp = table_token_logp(th, tok)
            total = agg.aggregate(clipped_surrogate(logp, logp, reward, msk).loss, msk, coef)
            if placement in ("loss", "both"):
                per_token = kl.loss_per_token(
                    logp, ref_logp, estimator=estimator, beta=BETA,
                    old_logp=sampled_logp if correction else None,
                )  # fmt: skip
                total += agg.aggregate(per_token, msk, coef)
            return total

        return jax.grad(loss)(theta).reshape(-1)

    return np.asarray(jax.jit(jax.vmap(one_batch))(tokens, mask), np.float64)


@pytest.mark.parametrize(
    "estimator,placement",
    [("k1", "reward"), ("k1", "both"), ("k3", "both")],
)
def test_kl_configurations_that_are_unbiased(kl_problem, estimator, placement):
    grad_kl = kl_problem[-1]
    mean, se = mean_and_se(kl_gradients(kl_problem, estimator, placement))
    assert np.all(np.abs(mean - BETA * grad_kl) <= Z * se + 1e-9)
    assert kl.kl_status(estimator, placement).startswith("unbiased")


def test_k1_in_loss_has_zero_mean_gradient(kl_problem):
    grad_kl = kl_problem[-1]
    mean, se = mean_and_se(kl_gradients(kl_problem, "k1", "loss"))
    assert np.all(np.abs(mean) <= Z * se + 1e-9)
    assert np.max(np.abs(BETA * grad_kl)) > 20 * np.max(se)  # a real gradient would show
    assert "zero gradient in expectation" in kl.kl_status("k1", "loss")


def test_k3_in_loss_is_biased(kl_problem):
    grad_kl = kl_problem[-1]
    mean, se = mean_and_se(kl_gradients(kl_problem, "k3", "loss"))
    gap = np.abs(mean - BETA * grad_kl) / (se + 1e-12)
    assert gap.max() > 4 * Z
    assert kl.kl_status("k3", "loss").startswith("biased")


def test_rho_weighted_k3_equals_k2_in_loss_on_policy(kl_problem):
    """At ρ = 1, ∇(ρ·k3) = (k3 + 1 − r)·∇ℓ = −log r·∇ℓ = ∇k2, sample by sample: both are
    the token-level reverse-KL gradient (DeepSeek-V3.2's 'unbiased KL' per token)."""
    a = kl_gradients(kl_problem, "k3", "loss", correction=True)
    b = kl_gradients(kl_problem, "k2", "loss")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert np.abs(a).max() > 1e-2
