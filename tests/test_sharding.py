"""Mesh construction and partition rules: sharded forward and gradients equal unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deltal_jax import sharding
from deltal_jax.models import get_preset, init_model, response_logprobs

CFG = get_preset("tiny", tie_embeddings=False)  # untied: lm_head gets its own rule


def _batch():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, CFG.vocab_size, (8, 6)).astype(np.int32)
    response = rng.integers(0, CFG.vocab_size, (8, 10)).astype(np.int32)
    prompt_mask = np.arange(6)[None] >= rng.integers(0, 4, (8, 1))
    response_mask = np.arange(10)[None] < rng.integers(1, 11, (8, 1))
    weights = rng.normal(size=(8, 10)).astype(np.float32)
    return prompt, prompt_mask, response, response_mask, weights


def _loss(model, batch):
    prompt, prompt_mask, response, response_mask, weights = batch
    out = response_logprobs(model, prompt, prompt_mask, response, response_mask, chunk_size=4)
    return jnp.sum(weights * out.logp) + 0.1 * jnp.sum(out.entropy)


@nnx.jit
def _logits_and_grads(model, batch):
    logits = model(jnp.concatenate([batch[0], batch[2]], axis=1))
    return logits, nnx.grad(_loss)(model, batch)


@pytest.fixture(scope="module")
def unsharded():
    return _logits_and_grads(init_model(CFG, seed=1), _batch())


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_forward_and_gradients_equal_unsharded(shape, unsharded):
    batch = _batch()
    expected_logits, expected_grads = unsharded

    mesh = sharding.make_mesh(shape)
    model = init_model(CFG, seed=1, mesh=mesh)
    with jax.set_mesh(mesh):
        logits, grads = _logits_and_grads(model, sharding.shard_batch(batch, mesh))
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    assert logits.addressable_shards[0].data.shape[0] == 8 // data_parallel
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    for (path, got), (_, want) in zip(
        nnx.to_flat_state(grads), nnx.to_flat_state(expected_grads), strict=True
    ):
        np.testing.assert_allclose(got[...], want[...], atol=1e-5, err_msg=str(path))


def test_fsdp_splits_every_matrix_over_the_fsdp_axis():
    mesh = sharding.make_mesh((1, 8, 1))
    model = init_model(CFG, seed=0, mesh=mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = var[...]
        shard = x.addressable_shards[0].data
        if path[-1] in ("kernel", "embedding"):
            assert shard.size * 8 == x.size, path
        else:  # norms and biases are replicated
            assert shard.size == x.size, path


def test_rules_leave_indivisible_dimensions_replicated():
    mesh = sharding.make_mesh((1, 2, 4))
    # 2 kv heads × 16 = 32 columns split by tensor=4 → 8 each; a 6-row bias cannot be.
    assert sharding.param_spec("layers/attn/k_proj/kernel", (2, 64, 32), mesh) == P(
        None, "fsdp", "tensor"
    )
    assert sharding.param_spec("layers/attn/k_proj/bias", (2, 6), mesh) == P(None, None)
    assert sharding.param_spec("embed/embedding", (250, 64), mesh) == P(None, "fsdp")
    assert sharding.param_spec("final_norm/scale", (64,), mesh) == P(None)


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
    mesh = sharding.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="does not use"):
        sharding.make_mesh((3, 1, 1))


def _per_device_bytes(cfg, mesh_shape, batch=8, prompt_len=256, response_len=1024) -> int:
    """XLA's per-device memory for one AdamW policy-gradient step of `cfg`, compiled ahead
    of time from abstract inputs (nothing of the model's size is allocated)."""
    mesh = sharding.make_mesh(mesh_shape)
    tx = optax.adamw(1e-6)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param)
    opt_state = jax.eval_shape(tx.init, params)
    abstract = lambda tree: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree,
        sharding.param_shardings(tree, mesh),
    )
    tokens = lambda t: jax.ShapeDtypeStruct(
        (batch, t), jnp.int32, sharding=sharding.batch_sharding(mesh)
    )
    masks = lambda t: jax.ShapeDtypeStruct((batch, t), bool, sharding=sharding.batch_sharding(mesh))
    adv = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=sharding.batch_sharding(mesh, 1))

    def step(params, opt_state, prompt, prompt_mask, response, response_mask, advantages):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logp = response_logprobs(model, prompt, prompt_mask, response, response_mask).logp
            return -jnp.sum(advantages[:, None] * logp) / jnp.sum(response_mask)

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    with jax.set_mesh(mesh):
        compiled = (
            jax.jit(step, donate_argnums=(0, 1))
            .lower(
                abstract(params),
                abstract(opt_state),
                tokens(prompt_len),
                masks(prompt_len),
                tokens(response_len),
                masks(response_len),
                adv,
            )
            .compile()
        )
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


@pytest.mark.slow  # three ahead-of-time compiles of a 36-layer model: ~30 s
def test_aot_per_device_memory_of_qwen2_5_3b_falls_as_fsdp_grows():
    cfg = get_preset("qwen2.5-3b", dtype="bfloat16", remat="full")
    gib = {f: _per_device_bytes(cfg, (8 // f, f, 1)) / 2**30 for f in (1, 2, 8)}
    assert gib[1] > gib[2] > gib[8]
    # Unsharded, the float32 parameters and both Adam moments alone take 12 bytes per
    # parameter (34.5 GiB); with fsdp=8 every device holds an eighth of them.
    params_gib = cfg.num_params() / 2**30
    assert gib[1] > 12 * params_gib
    assert gib[8] < gib[1] / 4
