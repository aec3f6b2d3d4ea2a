"""The layer loop's variants (scanned or unrolled, each remat policy) are the same
function: equal logits, prefill keys/values and gradients; the policies differ only in what
the backward pass keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltal_jax.models import get_preset, init_model
from deltal_jax.models.config import REMAT_POLICIES
from deltal_jax.models.transformer import attention_mask, positions_from_mask

CFG = get_preset("tiny")


def _outputs(cfg):
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)))
    valid = jnp.asarray([[1] * 9, [0, 0, 0] + [1] * 6], bool)  # left padding in row 1

    def loss(model):
        return jnp.sum(jax.nn.log_softmax(model(tokens, valid))[..., 0] * valid)

    grads = nnx.grad(loss)(model)
    _, kv = model.hidden_states(
        tokens, positions_from_mask(valid), attention_mask(jnp.arange(9), valid), return_kv=True
    )
    return model(tokens, valid), kv, nnx.to_flat_state(grads)


@pytest.mark.parametrize(
    "scan_layers, remat",
    [
        (False, "none"),
        (True, "dots"),
        (False, "dots"),
        (True, "projections"),
        (False, "projections"),
        (True, "full"),
        (False, "full"),
    ],
)
def test_layer_loop_variants_match_the_plain_scan(scan_layers, remat):
    logits, kv, grads = _outputs(CFG.replace(remat="none"))
    got_logits, got_kv, got_grads = _outputs(CFG.replace(scan_layers=scan_layers, remat=remat))
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_kv, kv, strict=True):
        assert a.shape == b.shape == (CFG.num_layers, 2, 9, CFG.num_kv_heads, CFG.head_dim)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for (path, a), (_, b) in zip(got_grads, grads, strict=True):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-6, err_msg=str(path))


def _saved_floats(cfg):
    """Floats the VJP of the forward keeps for the backward pass (weights included)."""
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    tokens = jnp.zeros((2, 9), jnp.int32)
    _, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(tokens), params)
    return sum(leaf.size for leaf in jax.tree.leaves(vjp))


def test_remat_policies_keep_less_and_less():
    weights = sum(a.size for a in jax.tree.leaves(nnx.state(init_model(CFG, seed=0))))
    saved = {r: _saved_floats(CFG.replace(remat=r)) - weights for r in REMAT_POLICIES}
    assert saved["none"] > saved["dots"] > saved["projections"] > saved["full"] > 0


def test_unknown_remat_policy_is_rejected():
    with pytest.raises(ValueError, match="remat='some'; accepted: none, dots, projections, full"):
        CFG.replace(remat="some")
