"""Loss aggregation: reference values, the identities of ALGORITHMS.md §9, split invariance."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deltal_jax import aggregation as agg
from deltal_jax.policy_loss import clipped_surrogate

MODES = [
    agg.TOKEN_MEAN,
    agg.SEQ_MEAN_TOKEN_MEAN,
    agg.SEQ_MEAN_TOKEN_SUM,
    agg.SEQ_MEAN_TOKEN_SUM_NORM,
    agg.DELTA_L,
]


def numpy_reference_loss(values, mask, mode, max_len, alpha=1.0):
    """Straightforward NumPy reading of the table in ALGORITHMS.md §1, loop by loop."""
    rows = [(v[m > 0], int(m.sum())) for v, m in zip(values, mask, strict=True)]
    rows = [(v, n) for v, n in rows if n > 0]
    big_n = len(rows)
    total_tokens = sum(n for _, n in rows)
    loss = 0.0
    for v, n in rows:
        if mode == agg.TOKEN_MEAN:
            c = 1.0 / total_tokens
        elif mode == agg.SEQ_MEAN_TOKEN_MEAN:
            c = 1.0 / (big_n * n)
        elif mode == agg.SEQ_MEAN_TOKEN_SUM:
            c = 1.0 / big_n
        elif mode == agg.SEQ_MEAN_TOKEN_SUM_NORM:
            c = 1.0 / (big_n * max_len)
        else:
            c = n**-alpha / (max_len * sum(k**-alpha for _, k in rows))
        loss += c * float(np.sum(v, dtype=np.float64))
    return loss


def fixed_batch(seed=0, n=8, t=10):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=n)
    lengths[3] = 0  # a padding row
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    values = rng.normal(size=(n, t)).astype(np.float32)
    return values, mask


@pytest.mark.parametrize(
    "mode,alpha", [(m, 1.0) for m in MODES] + [(agg.DELTA_L, a) for a in (0.0, 0.5, 0.75)]
)
def test_matches_numpy_reference(mode, alpha):
    values, mask = fixed_batch()
    max_len = 16
    c = agg.response_coefficients(
        agg.response_lengths(mask), mode=mode, max_response_len=max_len, alpha=alpha
    )
    got = agg.aggregate(jnp.asarray(values), jnp.asarray(mask), c)
    want = numpy_reference_loss(values, mask, mode, max_len, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "alias,mode",
    [
        ("grpo", agg.SEQ_MEAN_TOKEN_MEAN),
        ("dapo", agg.TOKEN_MEAN),
        ("dr_grpo", agg.SEQ_MEAN_TOKEN_SUM_NORM),
        ("bnpo", agg.TOKEN_MEAN_MICROBATCH_LEGACY),
        ("sequence-mean-token-mean", agg.SEQ_MEAN_TOKEN_MEAN),
        ("sequence-mean-token-scale", agg.SEQ_MEAN_TOKEN_SUM_NORM),
        ("VL-Norm", agg.DELTA_L),
        ("delta-l", agg.DELTA_L),
    ],
)
def test_aliases_resolve(alias, mode):
    assert agg.canonical_mode(alias) == mode


lengths_strategy = st.lists(st.integers(0, 64), min_size=1, max_size=48).filter(
    lambda xs: any(x > 0 for x in xs)
)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, max_len=st.integers(64, 4096))
def test_identity_delta_l_alpha0_is_dr_grpo(lengths, max_len):
    lengths = jnp.asarray(lengths, jnp.float32)
    a = agg.response_coefficients(lengths, mode="delta-l", max_response_len=max_len, alpha=0.0)
    b = agg.response_coefficients(lengths, mode="seq-mean-token-sum-norm", max_response_len=max_len)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, max_len=st.integers(64, 4096))
def test_identity_delta_l_alpha1_is_harmonic_scaled_grpo(lengths, max_len):
    arr = np.asarray(lengths, np.float64)
    valid = arr[arr > 0]
    harmonic = len(valid) / np.sum(1.0 / valid)
    a = agg.response_coefficients(
        jnp.asarray(arr, jnp.float32), mode="delta-l", max_response_len=max_len, alpha=1.0
    )
    b = agg.response_coefficients(
        jnp.asarray(arr, jnp.float32), mode="seq-mean-token-mean", max_response_len=max_len
    )
    np.testing.assert_allclose(a, harmonic / max_len * np.asarray(b), rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_strategy,
    max_len=st.integers(64, 8192),
    alpha=st.floats(0.0, 1.0),
    mode=st.sampled_from(["delta-l", "seq-mean-token-sum-norm"]),
)
def test_identity_coefficients_sum_to_one_over_m(lengths, max_len, alpha, mode):
    c = agg.response_coefficients(
        jnp.asarray(lengths, jnp.float32), mode=mode, max_response_len=max_len, alpha=alpha
    )
    np.testing.assert_allclose(np.sum(np.asarray(c, np.float64)) * max_len, 1.0, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(st.lists(st.integers(1, 64), min_size=4, max_size=4), min_size=1, max_size=8),
    alpha=st.floats(0.0, 1.0),
)
def test_group_scope_is_unbiased_and_normalises_each_group(groups, alpha):
    lengths = jnp.asarray(np.ravel(groups), jnp.float32)
    c = agg.response_coefficients(
        lengths, mode="delta-l", max_response_len=128, alpha=alpha, scope="group", group_size=4
    )
    np.testing.assert_allclose(float(jnp.sum(c)) * 128, 1.0, rtol=1e-5)
    # Every group gets the same total weight 1/(num_groups·M), split ∝ L^−α inside it.
    per_group = np.asarray(c).reshape(-1, 4)
    np.testing.assert_allclose(per_group.sum(-1), 1.0 / (len(groups) * 128), rtol=1e-5)
    w = np.asarray(groups, np.float64) ** -alpha
    np.testing.assert_allclose(
        per_group / per_group.sum(-1, keepdims=True), w / w.sum(-1, keepdims=True), rtol=1e-5
    )


def test_cv_ordering_of_grpo_deltal_dapo_drgrpo():
    """CV(GRPO) = CV(ΔL α=1) ≤ CV(DAPO) = CV(Dr. GRPO) (Cauchy–Schwarz), for the c_i spread."""
    lengths = jnp.asarray([3.0, 17.0, 60.0, 128.0, 5.0, 40.0])

    def weighted_variance(mode, alpha=1.0):
        # Var of Σ x_i g_i with Var(g_i) = L_i, normalised by the squared scale (Σ x_i)²:
        # this is the CV² of the aggregated gradient under the paper's model.
        x = agg.response_coefficients(lengths, mode=mode, max_response_len=128, alpha=alpha)
        return float(jnp.sum(x**2 * lengths) / jnp.sum(x) ** 2)

    grpo = weighted_variance("seq-mean-token-mean")
    delta = weighted_variance("delta-l", 1.0)
    dapo = weighted_variance("token-mean")
    dr = weighted_variance("seq-mean-token-sum-norm")
    np.testing.assert_allclose(grpo, delta, rtol=1e-5)
    np.testing.assert_allclose(dapo, dr, rtol=1e-5)
    assert delta < dr


# ---------------------------------------------------------------------------------------
# Split invariance: loss and gradient with respect to a parameter vector W that produces
# the log-probs, for every way of executing the same global batch.
# ---------------------------------------------------------------------------------------

N, T, D, V, G, MAX_LEN = 32, 12, 6, 5, 4, 16


def problem(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=N)
    lengths[5] = 0  # padding rows must not change anything
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    feats = rng.normal(size=(N, T, D)).astype(np.float32)
    tokens = rng.integers(0, V, size=(N, T)).astype(np.int32)
    w = rng.normal(size=(D, V)).astype(np.float32) * 0.5
    old_logp = np.log(rng.uniform(0.05, 0.9, size=(N, T))).astype(np.float32)
    adv = rng.normal(size=(N,)).astype(np.float32)
    batch = dict(feats=feats, tokens=tokens, mask=mask, old_logp=old_logp, adv=adv)
    return jnp.asarray(w), jax.tree.map(jnp.asarray, batch)


def token_logp(w, feats, tokens):
    logits = feats @ w  # [n, T, V]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]


def microbatch_loss(w, batch, coef, axis_name=None):
    logp = token_logp(w, batch["feats"], batch["tokens"])
    out = clipped_surrogate(
        logp,
        batch["old_logp"],
        batch["adv"],
        batch["mask"],
        eps_low=0.2,
        eps_high=0.28,
        clip_ratio_c=3.0,
    )
    return agg.aggregate(out.loss, batch["mask"], coef, axis_name=axis_name)


def coefficients(mask, mode, axis_name=None):
    """Global c_i for a split-test mode; "delta-l-group" is ΔL with scope="group"."""
    return agg.response_coefficients(
        agg.response_lengths(mask),
        mode=mode.removesuffix("-group"),
        max_response_len=MAX_LEN,
        alpha=0.75,
        scope="group" if mode.endswith("-group") else "batch",
        group_size=G,
        axis_name=axis_name,
    )


SPLIT_MODES = MODES + ["delta-l-group"]


def full_batch_value_and_grad(w, batch, mode):
    coef = coefficients(batch["mask"], mode)
    return jax.value_and_grad(microbatch_loss)(w, batch, coef)


@pytest.mark.parametrize("mode", SPLIT_MODES)
@pytest.mark.parametrize("num_micro", [2, 4])
def test_microbatch_accumulation_is_exact(mode, num_micro):
    w, batch = problem()
    loss, grad = full_batch_value_and_grad(w, batch, mode)
    coef = coefficients(batch["mask"], mode)  # once, from the global batch
    acc_loss, acc_grad = 0.0, jnp.zeros_like(w)
    for k in range(num_micro):
        sl = slice(k * N // num_micro, (k + 1) * N // num_micro)
        mb = jax.tree.map(lambda x, sl=sl: x[sl], batch)
        l_k, g_k = jax.value_and_grad(microbatch_loss)(w, mb, coef[sl])
        acc_loss, acc_grad = acc_loss + l_k, acc_grad + g_k
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(acc_grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_padding_columns_change_nothing(mode):
    w, batch = problem()
    loss, grad = full_batch_value_and_grad(w, batch, mode)
    extra = 7
    rng = np.random.default_rng(1)
    padded = dict(
        feats=jnp.concatenate([batch["feats"], rng.normal(size=(N, extra, D)) * 100], 1),
        tokens=jnp.concatenate([batch["tokens"], jnp.zeros((N, extra), jnp.int32)], 1),
        mask=jnp.concatenate([batch["mask"], jnp.zeros((N, extra))], 1),
        # Garbage, even NaN, in padding must not leak into the loss or gradient.
        old_logp=jnp.concatenate([batch["old_logp"], jnp.full((N, extra), jnp.nan)], 1),
        adv=batch["adv"],
    )
    loss_p, grad_p = full_batch_value_and_grad(w, padded, mode)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_p, grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(grad_p))


def test_legacy_microbatch_token_mean_depends_on_split():
    """The legacy mean equals the global token mean for one micro-batch, not for uneven ones."""
    w, batch = problem()
    lengths = agg.response_lengths(batch["mask"])
    global_c = agg.response_coefficients(lengths, mode="token-mean", max_response_len=MAX_LEN)
    one = agg.response_coefficients(
        lengths, mode="token-mean-microbatch-legacy", max_response_len=MAX_LEN
    )
    four = agg.response_coefficients(
        lengths, mode="token-mean-microbatch-legacy", max_response_len=MAX_LEN, num_microbatches=4
    )
    np.testing.assert_allclose(one, global_c, rtol=1e-6)
    l_global = microbatch_loss(w, batch, global_c)
    l_four = microbatch_loss(w, batch, four)
    assert abs(float(l_four - l_global)) > 1e-4
    # and it is the average of the per-micro-batch token means
    means = []
    for k in range(4):
        sl = slice(k * N // 4, (k + 1) * N // 4)
        mb = jax.tree.map(lambda x, sl=sl: x[sl], batch)
        c_local = agg.response_coefficients(
            agg.response_lengths(mb["mask"]), mode="token-mean", max_response_len=MAX_LEN
        )
        means.append(microbatch_loss(w, mb, c_local))
    np.testing.assert_allclose(l_four, np.mean(means), rtol=1e-5)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
    return jax.make_mesh((8,), ("data",))


@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_jit_with_named_sharding_matches_single_device(mode, mesh):
    w, batch = problem()
    loss, grad = full_batch_value_and_grad(w, batch, mode)
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    w_rep = jax.device_put(w, NamedSharding(mesh, P()))
    loss_s, grad_s = jax.jit(full_batch_value_and_grad, static_argnums=2)(w_rep, sharded, mode)
    assert sharded["mask"].sharding.spec == P("data")
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_s, grad, rtol=1e-5, atol=1e-7)


def pmap_value_and_grad(w, batch, mode, axis_name):
    """pmap idiom: global normalisers, local loss and gradient, then psum of both."""
    coef = coefficients(batch["mask"], mode, axis_name=axis_name)
    local = jax.value_and_grad(microbatch_loss)(w, batch, coef)
    return jax.lax.psum(local, axis_name)


def shard_map_value_and_grad(w, batch, mode, axis_name):
    """shard_map idiom: the loss itself is psum'd; w is replicated, so its gradient is
    reduced over the axis by JAX (the transpose of the implicit broadcast)."""
    coef = coefficients(batch["mask"], mode, axis_name=axis_name)
    return jax.value_and_grad(microbatch_loss)(w, batch, coef, axis_name)


@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_shard_map_matches_single_device(mode, mesh):
    w, batch = problem()
    loss, grad = full_batch_value_and_grad(w, batch, mode)
    fn = jax.shard_map(
        functools.partial(shard_map_value_and_grad, mode=mode, axis_name="data"),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=(P(), P()),
    )
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    loss_s, grad_s = jax.jit(fn)(jax.device_put(w, NamedSharding(mesh, P())), sharded)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_s, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_pmap_matches_single_device(mode):
    w, batch = problem()
    loss, grad = full_batch_value_and_grad(w, batch, mode)
    split = jax.tree.map(lambda x: x.reshape(8, N // 8, *x.shape[1:]), batch)
    fn = jax.pmap(
        functools.partial(pmap_value_and_grad, mode=mode, axis_name="i"),
        axis_name="i",
        in_axes=(None, 0),
    )
    loss_p, grad_p = fn(w, split)
    np.testing.assert_allclose(loss_p[0], loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_p[0], grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------


def test_unknown_mode_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"Unknown loss aggregation mode 'seq-mean'.*token-mean"):
        agg.response_coefficients(jnp.ones(4), mode="seq-mean", max_response_len=8)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        agg.response_coefficients(jnp.ones(4), mode="delta-l", max_response_len=8, alpha=alpha)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_response_len=0), "max_response_len must be a positive int"),
        (dict(scope="prompt"), "scope must be one of"),
        (dict(scope="group", group_size=None), "needs group_size"),
        (dict(scope="group", group_size=3), "not a multiple of group_size=3"),
    ],
)
def test_bad_delta_l_settings(kwargs, match):
    kwargs = {"max_response_len": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        agg.response_coefficients(jnp.ones(4), mode="delta-l", **kwargs)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="must have equal shapes"):
        agg.aggregate(jnp.ones((4, 5)), jnp.ones((4, 6)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"coefficients must have shape \[4\]"):
        agg.aggregate(jnp.ones((4, 5)), jnp.ones((4, 5)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"lengths must have shape \[N\]"):
        agg.response_coefficients(jnp.ones((4, 5)), mode="token-mean", max_response_len=8)


@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_all_zero_mask_gives_zero_loss_and_gradient(mode):
    w, batch = problem()
    batch = dict(batch, mask=jnp.zeros_like(batch["mask"]))
    loss, grad = full_batch_value_and_grad(w, batch, mode)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_coefficient_stats_report_unbiased_scale_and_harmonic_mean():
    lengths = jnp.asarray([2.0, 4.0, 8.0, 0.0])
    c = agg.response_coefficients(lengths, mode="delta-l", max_response_len=16, alpha=1.0)
    stats = agg.coefficient_stats(c, lengths, max_response_len=16)
    np.testing.assert_allclose(stats["coef_sum_times_m"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats["harmonic_len_over_m"], 3 / (1 / 2 + 1 / 4 + 1 / 8) / 16)
    np.testing.assert_allclose(stats["coef_max_over_min"], 4.0, rtol=1e-6)
