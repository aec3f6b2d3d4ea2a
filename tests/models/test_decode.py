"""One-token decoding over the KV cache reproduces the teacher-forced forward: the logits
and the cache it leaves behind equal those of one pass over the whole sequence."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltal_jax.models import KVCache, attention_mask, get_preset, init_model, positions_from_mask

TINY = get_preset("tiny")
CONFIGS = {
    "qwen2": TINY,  # qkv bias, tied embeddings
    "qwen3": TINY.replace(model_type="qwen3", qkv_bias=False, qk_norm=True, tie_embeddings=False),
}
B, P, N = 3, 5, 4  # rows, prompt slots, decoded tokens


@nnx.jit
def _prefill_then_decode(model, tokens, valid):
    """Prefills slots 0..P-1 of a P+N cache, then decodes slots P..P+N-1 one at a time →
    (the logits after each decoded token [B, N, V], final cache)."""
    positions = positions_from_mask(valid)
    _, (k, v) = model.hidden_states(
        tokens[:, :P],
        positions[:, :P],
        attention_mask(jnp.arange(P), valid[:, :P]),
        return_kv=True,
    )
    cache = KVCache.from_prefill(k, v, P + N)
    weights = model.decode_weights(P + N)
    logits = []
    for slot in range(P, P + N):
        key_mask = attention_mask(jnp.full((1,), slot), valid)[:, 0]
        step_logits, cache = model.decode_step(
            tokens[:, slot], positions[:, slot], key_mask, cache, slot, weights
        )
        logits.append(step_logits)
    return jnp.stack(logits, axis=1), cache


@nnx.jit
def _one_pass(model, tokens, valid):
    """The teacher-forced pass over all P+N slots → (logits [B, P+N, V], its full cache)."""
    t = tokens.shape[1]
    hidden, (k, v) = model.hidden_states(
        tokens, positions_from_mask(valid), attention_mask(jnp.arange(t), valid), return_kv=True
    )
    return model.unembed(hidden), KVCache.from_prefill(k, v, t)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_decode_steps_leave_the_cache_and_logits_of_one_full_pass(family):
    model = init_model(CONFIGS[family], seed=1)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, P + N)), jnp.int32)
    valid = np.ones((B, P + N), bool)
    valid[1, :2] = False  # left padding
    valid[2, 3:P] = False  # right-padded prompt: decoded tokens follow a gap
    valid = jnp.asarray(valid)

    logits, cache = _prefill_then_decode(model, tokens, valid)
    ref_logits, ref_cache = _one_pass(model, tokens, valid)

    np.testing.assert_allclose(logits, ref_logits[:, P:], atol=2e-5)
    # Padding slots hold keys that no query sees: a padding query with nothing before it
    # attends uniformly to every (masked) slot, so its garbage depends on the pass length.
    assert len(cache.k) == len(cache.v) == TINY.num_layers
    for got, want in zip(cache.k, ref_cache.k, strict=True):  # [B, K, Dh, S]
        assert got.shape == want.shape
        np.testing.assert_allclose(
            np.where(valid[:, None, None, :], got, 0),
            np.where(valid[:, None, None, :], want, 0),
            atol=2e-5,
        )
    for got, want in zip(cache.v, ref_cache.v, strict=True):  # [B, K, S, Dh]
        assert got.shape == want.shape
        np.testing.assert_allclose(
            np.where(valid[:, None, :, None], got, 0),
            np.where(valid[:, None, :, None], want, 0),
            atol=2e-5,
        )


def test_cache_layout_keys_transposed_values_not():
    k = jnp.arange(2 * 3 * 4 * 5 * 6, dtype=jnp.float32).reshape(2, 3, 4, 5, 6)  # [L,B,T,K,Dh]
    cache = KVCache.from_prefill(k, -k, 7)
    assert cache.k[1].shape == (3, 5, 6, 7) and cache.v[1].shape == (3, 5, 7, 6)
    # Layer 1, row 2, slot 3, head 4, dim 5 ends up at [2, 4, 5, 3] of k and [2, 4, 3, 5] of v.
    assert cache.k[1][2, 4, 5, 3] == k[1, 2, 3, 4, 5]
    assert cache.v[1][2, 4, 3, 5] == -k[1, 2, 3, 4, 5]
    np.testing.assert_array_equal(cache.k[0][..., 4:], 0)  # slots after the prefill
    with pytest.raises(ValueError, match="cache length 3 < the 4 prefilled tokens"):
        KVCache.from_prefill(k, k, 3)


def test_grow_appends_empty_slots():
    k = jnp.arange(2 * 3 * 4 * 5 * 6, dtype=jnp.float32).reshape(2, 3, 4, 5, 6) + 1
    cache = KVCache.from_prefill(k, -k, 5)
    grown, direct = cache.grow(9), KVCache.from_prefill(k, -k, 9)
    assert grown.k[1].shape == (3, 5, 6, 9) and grown.v[1].shape == (3, 5, 9, 6)
    for got, want in zip(grown.k + grown.v, direct.k + direct.v, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(grown.k[0][..., 5:], 0)
    assert cache.grow(5) is cache
    with pytest.raises(ValueError, match="cannot shrink a cache of 5 slots to 4"):
        cache.grow(4)


def test_decode_step_ignores_whatever_masked_cache_slots_hold():
    """Slots the key mask excludes (future slots, padding) do not change the output, so the
    zeros after the prefill and the keys of padding need no special treatment."""
    model = init_model(TINY, seed=2)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, P)), jnp.int32)
    valid = jnp.ones((B, P + 3), bool).at[0, 1].set(False)  # row 0: slot 1 is padding
    _, (k, v) = model.hidden_states(
        tokens,
        positions_from_mask(valid[:, :P]),
        attention_mask(jnp.arange(P), valid[:, :P]),
        return_kv=True,
    )
    cache = KVCache.from_prefill(k, v, P + 3)
    noisy = KVCache(  # slots after P and row 0's padding slot overwritten with large values
        tuple(c.at[..., P + 1 :].set(1e3).at[0, ..., 1].set(-1e3) for c in cache.k),
        tuple(c.at[:, :, P + 1 :].set(1e3).at[0, :, 1].set(-1e3) for c in cache.v),
    )
    key_mask = attention_mask(jnp.full((1,), P), valid)[:, 0]
    step = nnx.jit(
        lambda m, c: m.decode_step(
            jnp.ones(B, jnp.int32), jnp.full(B, P), key_mask, c, P, m.decode_weights(P + 1)
        )
    )
    clean, noisy = step(model, cache), step(model, noisy)
    np.testing.assert_allclose(noisy[0], clean[0], atol=1e-6)
    np.testing.assert_allclose(noisy[1].k[0][..., P], clean[1].k[0][..., P], atol=1e-6)


def test_decode_step_past_its_rope_table_gives_nan_not_a_wrong_position():
    """`decode_weights(n)` holds RoPE angles for positions < n; a step at position n must
    not silently reuse another position's angles (a clamped gather would)."""
    model = init_model(TINY, seed=3)
    kv = jnp.zeros((TINY.num_layers, B, P, TINY.num_kv_heads, TINY.head_dim))
    cache = KVCache.from_prefill(kv, kv, P + 1)
    key_mask = jnp.ones((B, P + 1), bool)
    positions = jnp.array([P - 1, P, P - 1])  # row 1 is past a table of P positions
    logits, _ = nnx.jit(
        lambda m: m.decode_step(
            jnp.ones(B, jnp.int32), positions, key_mask, cache, P, m.decode_weights(P)
        )
    )(model)
    logits = np.asarray(logits)
    assert np.isnan(logits[1]).all()
    assert np.isfinite(logits[[0, 2]]).all()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_decode_layer_weights_join_each_kv_heads_projections(family):
    """The joined kernels hold, per kv head k, its G query heads, its key and its value
    projection ([out, in]), and the gate above the up projection: the layout the decode
    step slices (a wrong order would still pass a test whose heads were all alike)."""
    cfg = CONFIGS[family]
    model = init_model(cfg, seed=4)
    kh, g, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    state = nnx.to_pure_dict(nnx.state(model.layers))
    a, m = state["attn"], state["mlp"]
    w = model.decode_weights(1).layers[1]
    qkv = np.asarray(w["attn"]["qkv"]["kernel"])
    assert qkv.shape == (kh, (g + 2) * dh, cfg.hidden_size)
    for k in range(kh):
        for j in range(g):
            head = k * g + j
            np.testing.assert_array_equal(
                qkv[k, j * dh : (j + 1) * dh],
                a["q_proj"]["kernel"][1][:, head * dh : (head + 1) * dh].T,
            )
        np.testing.assert_array_equal(
            qkv[k, g * dh : (g + 1) * dh], a["k_proj"]["kernel"][1][:, k * dh : (k + 1) * dh].T
        )
        np.testing.assert_array_equal(
            qkv[k, (g + 1) * dh :], a["v_proj"]["kernel"][1][:, k * dh : (k + 1) * dh].T
        )
    if cfg.qkv_bias:
        bias = np.asarray(w["attn"]["qkv"]["bias"])
        np.testing.assert_array_equal(bias[:, : g * dh].ravel(), a["q_proj"]["bias"][1])
        np.testing.assert_array_equal(
            bias[:, g * dh : (g + 1) * dh].ravel(), a["k_proj"]["bias"][1]
        )
        np.testing.assert_array_equal(bias[:, (g + 1) * dh :].ravel(), a["v_proj"]["bias"][1])
    else:
        assert "bias" not in w["attn"]["qkv"]
    assert ("q_norm" in w["attn"]) == cfg.qk_norm
    np.testing.assert_array_equal(w["attn"]["o_proj"]["kernel"], a["o_proj"]["kernel"][1].T)
    gate_up = np.asarray(w["mlp"]["gate_up"]["kernel"])
    np.testing.assert_array_equal(gate_up[0], m["gate_proj"]["kernel"][1].T)
    np.testing.assert_array_equal(gate_up[1], m["up_proj"]["kernel"][1].T)
    np.testing.assert_array_equal(w["mlp"]["down_proj"]["kernel"], m["down_proj"]["kernel"][1].T)
