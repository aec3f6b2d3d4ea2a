"""`linear_dot_general`, the matmul of every `nnx.Linear` in the decoder, is `lax.dot_general`
with a hand-written backward on CPU: its values and both gradients must equal autodiff's,
in each branch of the weight gradient (x or dy transposed), for N-D inputs and low
precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltal_jax.models import get_preset, init_model
from deltal_jax.models.transformer import linear_dot_general

DIMS = lambda ndim: (((ndim - 1,), (0,)), ((), ()))  # noqa: E731


def _value_and_grads(dot, x, w, dy, **kwargs):
    y, vjp = jax.vjp(lambda x, w: dot(x, w, DIMS(x.ndim), **kwargs), x, w)
    return (y, *vjp(dy))


@pytest.mark.parametrize(
    "x_shape, d_out",
    [
        ((12, 8), 24),  # d_in < d_out: x is transposed
        ((12, 24), 8),  # d_in > d_out: dy is transposed, the product transposed back
        ((2, 6, 8), 8),  # N-D input, equal widths
        ((3, 2, 5, 24), 8),
    ],
)
@pytest.mark.parametrize(
    "dtype, preferred, tol",
    [(jnp.float32, None, 1e-5), (jnp.bfloat16, None, 2e-2), (jnp.bfloat16, jnp.float32, 1e-2)],
)
def test_values_and_gradients_equal_autodiff(x_shape, d_out, dtype, preferred, tol):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, x_shape, dtype)
    w = jax.random.normal(k2, (x_shape[-1], d_out), dtype)
    dy = jax.random.normal(k3, (*x_shape[:-1], d_out), preferred or dtype)
    kwargs = dict(preferred_element_type=preferred)
    got = jax.jit(lambda *a: _value_and_grads(linear_dot_general, *a, **kwargs))(x, w, dy)
    want = jax.jit(lambda *a: _value_and_grads(jax.lax.dot_general, *a, **kwargs))(x, w, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale, err_msg=name
        )


def test_model_gradients_equal_autodiff_through_every_linear():
    cfg = get_preset("tiny").replace(tie_embeddings=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)))

    def grads(model):
        loss = lambda m: jnp.sum(jax.nn.log_softmax(m(tokens)) * jnp.arange(cfg.vocab_size))  # noqa: E731
        return nnx.to_flat_state(nnx.grad(loss)(model))

    model = init_model(cfg, seed=0)
    linears = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
    assert len(linears) == 8  # q, k, v, o, gate, up, down, lm_head
    assert all(m.dot_general is linear_dot_general for m in linears)
    got = grads(model)
    for m in linears:
        m.dot_general = jax.lax.dot_general
    for (path, a), (_, b) in zip(got, grads(model), strict=True):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-6, err_msg=str(path))
