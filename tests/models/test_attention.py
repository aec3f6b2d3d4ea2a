"""`softmax_attend`'s hand-written gradient equals autodiff of softmax(scores) @ values,
including masked keys and fully masked rows, in float32 and with bfloat16 values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltal_jax.models.transformer import _MASK_VALUE, softmax_attend


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
