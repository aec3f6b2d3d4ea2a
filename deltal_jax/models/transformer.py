"""Decoder-only transformer (Qwen2/2.5, Qwen3, Llama 3/3.1) in Flax NNX.

Layers are stored stacked (every per-layer parameter has a leading [L] axis) and run with
`lax.scan`, so compile time does not grow with depth and per-layer remat is one
`jax.checkpoint`. The KV cache is an explicit pytree passed in and returned, which keeps the
model a pure function of (params, inputs) under `jit`, `while_loop` and `shard_map`.

Shape names: B batch, T query length, S key length (cache slots), D hidden, H query heads,
K key/value heads, G = H / K query heads per kv head, Dh head dim, F MLP width, V vocab,
L layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltal_jax import sharding
from deltal_jax.models.config import ModelConfig

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully masked rows stay NaN-free


class KVCache(NamedTuple):
    """Keys and values of every layer at every cache slot: k, v [L, B, S, K, Dh]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies θ^(-2i/Dh), i < Dh/2, with Llama 3.1 scaling when configured."""
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    wavelen = 2 * np.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    # Weight of the unscaled frequency: 1 for short wavelengths, 0 for long, linear between.
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smooth = np.where(
        wavelen < high_freq_wavelen, 1.0, np.where(wavelen > low_freq_wavelen, 0.0, smooth)
    )
    return ((1 - smooth) * inv_freq / s.factor + smooth * inv_freq).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, Dh] for integer positions [B, T] (the two halves repeat, HF layout)."""
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, n, Dh] by the angles of cos, sin [B, T, Dh] (rotate-half convention)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(query_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
    """[B, T, S] bool: query at cache slot q may see key slot s iff s <= q and s holds a token.

    query_slots [B, T] or [T] int; key_valid [B, S] bool.
    """
    key_slots = jnp.arange(key_valid.shape[-1])
    causal = key_slots[None, None, :] <= jnp.atleast_2d(query_slots)[:, :, None]
    return causal & key_valid[:, None, :]


def positions_from_mask(valid: jax.Array) -> jax.Array:
    """RoPE positions [B, T] that count only real tokens, so padding anywhere leaves the
    positions of the real tokens 0, 1, 2, ... (matching HF with position_ids from the mask)."""
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + ε) · w, with the statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: str):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


def _linear(cfg: ModelConfig, din: int, dout: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional qkv bias and q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _linear(cfg, d, h * dh, cfg.qkv_bias, rngs)
        self.k_proj = _linear(cfg, d, k * dh, cfg.qkv_bias, rngs)
        self.v_proj = _linear(cfg, d, k * dh, cfg.qkv_bias, rngs)
        self.o_proj = _linear(cfg, h * dh, d, False, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
            self.k_norm = RMSNorm(dh, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        cache_index: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, D], mask [B, T, S]; kv: this layer's cache k, v [B, S, K, Dh] or None
        (then S = T). The new keys/values are written at slots cache_index .. cache_index+T."""
        cfg = self.cfg
        b, t, _ = x.shape
        kh, g, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        x2 = x.reshape(b * t, -1)  # 2-D projections, as in the MLP
        q = self.q_proj(x2).reshape(b, t, cfg.num_heads, dh)
        k = self.k_proj(x2).reshape(b, t, kh, dh)
        v = self.v_proj(x2).reshape(b, t, kh, dh)
        if cfg.qk_norm:  # Qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = sharding.constrain(q, ("batch", None, "heads", None))
        k = sharding.constrain(k, ("batch", None, "kv_heads", None))
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), cache_index, 1)
        q = q.reshape(b, t, kh, g, dh)
        scores = jnp.einsum(
            "btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32
        )
        scores = scores * dh**-0.5
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(cfg.dtype))
        out = self.o_proj(out.reshape(b * t, cfg.num_heads * dh)).reshape(b, t, -1)
        return out, (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.mlp_dim, False, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.mlp_dim, False, rngs)
        self.down_proj = _linear(cfg, cfg.mlp_dim, cfg.hidden_size, False, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # [B, T, D] → [B·T, D]: XLA:CPU lowers the backward of 2-D matmuls to plain GEMMs
        # but adds transpose-copies for the 3-D ones (train step 50% → 65% of peak).
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = sharding.constrain(h, ("batch", "mlp"))
        return self.down_proj(h).reshape(shape)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv, cache_index):
        h, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, cache_index)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return sharding.constrain(x, ("batch", None, "embed")), kv


class Decoder(nnx.Module):
    """Token ids → hidden states → logits.

    `__call__(tokens, valid)` is the plain teacher-forced forward. `hidden_states` and
    `unembed` are the two halves, used by the sampler (with a KV cache) and by the log-prob
    function (which unembeds in chunks to avoid a float32 [B, T, V] tensor).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = stacked_layers(rngs)
        self.final_norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype
        )
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions [B, T]; mask [B, T, S] → final-normed hidden [B, T, D] and the
        cache with this chunk's keys/values written at slots cache_index .. cache_index+T."""
        x = sharding.constrain(self.embed(tokens), ("batch", None, "embed"))
        cos, sin = rope_tables(self.cfg, positions)
        graphdef, layer_state = nnx.split(self.layers)

        def layer(x, state_and_kv):
            state, kv = state_and_kv
            x, kv = nnx.merge(graphdef, state)(x, cos, sin, mask, kv, cache_index)
            return x, (kv if cache is not None else None)

        if self.cfg.remat:
            layer = jax.checkpoint(layer, prevent_cse=False)
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = jax.lax.scan(layer, x, (layer_state, kv))
        return self.final_norm(x), (None if cache is None else KVCache(*kv))

    def unembed_matrix(self) -> jax.Array:
        """[D, V] in the compute dtype."""
        if self.cfg.tie_embeddings:
            return self.embed.embedding[...].T.astype(self.cfg.dtype)
        return self.lm_head.kernel[...].astype(self.cfg.dtype)

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] → float32 logits [..., V]."""
        logits = jnp.einsum(
            "...d,dv->...v",
            hidden.astype(self.cfg.dtype),
            self.unembed_matrix(),
            preferred_element_type=jnp.float32,
        )
        return sharding.constrain(logits, ("batch", None, "vocab")) if logits.ndim == 3 else logits

    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [B, T, V] (float32) for tokens [B, T]; valid [B, T] marks
        real tokens (default: all), padding may sit anywhere."""
        if valid is None:
            valid = jnp.ones(tokens.shape, bool)
        mask = attention_mask(jnp.arange(tokens.shape[1]), valid)
        hidden, _ = self.hidden_states(tokens, positions_from_mask(valid), mask)
        return self.unembed(hidden)
