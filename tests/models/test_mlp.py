"""The MLP's rematerialised SwiGLU: the same values and gradients as silu(gate) · up, with
fewer activations saved for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from deltal_jax.models.transformer import swiglu

N, F, D = 6, 4, 3


def _inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(keys[0], (N, F)),
        jax.random.normal(keys[1], (N, F)),
        jax.random.normal(keys[2], (F, D)),
    )


def _down(act):
    """gate, up, w → act(gate, up) @ w, as the MLP feeds the product to down_proj."""
    return lambda gate, up, w: act(gate, up) @ w


def _plain(gate, up):
    return jax.nn.silu(gate) * up


def test_swiglu_values_and_gradients_equal_the_plain_expression():
    args = _inputs()
    np.testing.assert_allclose(swiglu(*args[:2]), _plain(*args[:2]), rtol=1e-6)
    loss = lambda act: lambda *a: jnp.sum(jnp.sin(_down(act)(*a)))
    got = jax.grad(loss(swiglu), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss(_plain), argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_swiglu_backward_saves_gate_and_up_only():
    """Residuals of the [N, F] shape kept by the VJP: gate, up and the product (the input of
    the next matmul) with the remat; plain autodiff keeps intermediates of silu as well
    (three more with jax 0.10)."""

    def saved(act):
        _, vjp = jax.vjp(_down(act), *_inputs())
        return sum(leaf.shape == (N, F) for leaf in jax.tree.leaves(vjp))

    assert saved(swiglu) == 3
    assert saved(_plain) > 3
