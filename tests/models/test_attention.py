"""`softmax_attend`'s hand-written gradient equals autodiff of softmax(scores) @ values,
including masked keys and fully masked rows, in float32 and with bfloat16 values; the mask
bias has the scores' layout, and both of its layouts (CPU, GPU/TPU) give the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltal_jax.models import get_preset, init_model, transformer
from deltal_jax.models.transformer import (
    _MASK_VALUE,
    mask_bias,
    softmax_attend,
)


def _reference(scores, values):
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("nqs,nsd->nqd", probs, values)


def _inputs(dtype):
    rng = np.random.default_rng(0)
    n, q, s, d = 3, 5, 7, 4
    scores = rng.normal(size=(n, q, s)).astype(np.float32) * 3
    masked = rng.random((n, q, s)) < 0.3
    masked[1, 2] = True  # a row that sees nothing: uniform, as in the model's bias
    scores = jnp.asarray(np.where(masked, scores + _MASK_VALUE, scores))
    values = jnp.asarray(rng.normal(size=(n, s, d)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(n, q, d)), dtype)
    return scores, values, cotangent


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_value_and_gradient_match_autodiff(dtype, tol):
    scores, values, cotangent = _inputs(dtype)
    out, vjp = jax.vjp(softmax_attend, scores, values)
    want, want_vjp = jax.vjp(_reference, scores, values)
    assert out.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.float32(out), np.float32(want), rtol=tol, atol=tol)
    for got, ref in zip(vjp(cotangent), want_vjp(cotangent), strict=True):
        assert got.dtype == ref.dtype
        np.testing.assert_allclose(np.float32(got), np.float32(ref), rtol=tol, atol=tol)


def test_fully_masked_row_is_uniform_and_finite():
    scores, values, cotangent = _inputs(jnp.float32)
    out = softmax_attend(scores, values)
    np.testing.assert_allclose(out[1, 2], values[1].mean(0), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda s, v: jnp.sum(softmax_attend(s, v) * cotangent), (0, 1))(scores, values)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    # Gradient wrt a score is p · (dp − Σ p dp): zero for keys with p = 0.
    p = jax.nn.softmax(scores, axis=-1)
    assert float(jnp.abs(jnp.where(p == 0, grads[0], 0)).max()) == 0.0


def test_primal_equals_the_differentiated_forward():
    scores, values, _ = _inputs(jnp.float32)
    primal = jax.jit(softmax_attend)(scores, values)
    under_grad = jax.jit(lambda s, v: jax.vjp(softmax_attend, s, v)[0])(scores, values)
    np.testing.assert_array_equal(primal, under_grad)


@pytest.mark.parametrize("copies", [1, 2])
def test_mask_bias_repeats_each_query_row_for_its_heads(copies):
    """Row (b·C + c, t·G + g) of the bias is query t's row of mask[b], for every head."""
    b, t, s, g = 2, 5, 7, 3
    mask = np.random.default_rng(1).random((b, t, s)) < 0.6
    bias = np.asarray(mask_bias(jnp.asarray(mask), copies, g))
    assert bias.shape == (b * copies, t * g, s) and bias.dtype == np.float32
    want = np.where(mask, 0.0, _MASK_VALUE).astype(np.float32)
    for row in range(b * copies):
        for q in range(t * g):
            np.testing.assert_array_equal(bias[row, q], want[row // copies, q // g])


def test_one_bias_copy_per_layer_gives_the_same_model_as_one_per_kv_head(monkeypatch):
    """`Decoder.hidden_states` off the CPU backend (one bias copy, built in each layer) and on
    it (one per kv head, built once): equal logits and gradients, with left padding so that
    the mask matters. (Posing as a GPU also switches the linear layers to plain
    `lax.dot_general`, the same arithmetic.)"""
    cfg = get_preset("tiny")
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)))
    valid = jnp.asarray([[1] * 9, [0, 0, 0] + [1] * 6], bool)
    built = []

    def record(mask, copies, group):
        built.append(copies)
        return mask_bias(mask, copies, group)

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens, valid)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * valid), logits

    monkeypatch.setattr(transformer, "mask_bias", record)
    per_kv_head = jax.value_and_grad(loss, has_aux=True)(state)
    assert built == [cfg.num_kv_heads]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    one_copy = jax.value_and_grad(loss, has_aux=True)(state)
    assert built[0] == cfg.num_kv_heads and set(built[1:]) == {1}  # traced in the scanned layer
    for got, want in zip(jax.tree.leaves(one_copy), jax.tree.leaves(per_kv_head), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
