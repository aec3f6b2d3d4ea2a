"""Decoder-only transformer (Qwen2/2.5, Qwen3, Llama 3/3.1) in Flax NNX.

Layers are stored stacked (every per-layer parameter has a leading [L] axis). The
teacher-forced forward (training, log-probs, the sampler's prefill) runs them with
`lax.scan`, so compile time does not grow with depth and per-layer remat is one
`jax.checkpoint`; `ModelConfig.scan_layers=False` unrolls that loop instead (the same
arithmetic, a compile time linear in depth, no stacked residual buffers).

One-token decoding (`Decoder.decode_step`) always unrolls the layers, over weights sliced
once before the sampler's decode loop (`decode_weights`), where a scan would dynamic-slice
(copy) every layer's weights at every token; its activations are feature-major [D, B]
(`decode_layer`); and each layer's KV cache is its own loop-carried buffer, updated in
place. The price is a compile time linear in depth for the decode step and, while
sampling, a second copy of the layer weights (the slices). The KV cache is an explicit
pytree passed in and returned, which keeps the model a pure function of (params, inputs)
under `jit`, `while_loop` and `shard_map`.

Shape names: B batch, T query length, S key length (cache slots), D hidden, H query heads,
K key/value heads, G = H / K query heads per kv head, Dh head dim, F MLP width, V vocab,
L layers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltal_jax import sharding
from deltal_jax.models.config import ModelConfig

# ModelConfig.remat → the jax.checkpoint policy of each layer. "dots" keeps the matmul
# outputs and recomputes the elementwise work between them: plain autodiff also saves the
# intermediates of RMSNorm, softmax and SwiGLU (six [B·T, F] arrays per layer in the MLP
# instead of three), each copied into a stacked [L, ...] buffer under `lax.scan`. On the
# bench-medium update "dots" ran 5–10% faster than "none" (interleaved A/B, CPU) and cut
# XLA's temporaries from 3.39 to 2.46 GiB. "projections" (the default) keeps only the
# outputs of the weight matmuls, the dots without batch dimensions, and recomputes
# attention's q·kᵀ and p·v: it does not store [B, K, T·G, T] scores per layer, whose size
# grows with T², for about 1% more FLOPs at T = 160. On CPU it was faster as well
# (interleaved A/Bs, paired median ratio to "dots": bench-medium 0.977, 0.978 and 0.967
# over 10, 14 and 12 rounds, bench-small 0.958 over 20; temporaries 1.64 → 1.37 GiB).
_REMAT_POLICY = {
    "dots": jax.checkpoint_policies.dots_saveable,
    "projections": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully masked rows stay NaN-free


class KVCache(NamedTuple):
    """Keys and values of each layer at every cache slot, laid out for one-token decoding:
    k[l] [B, K, Dh, S], v[l] [B, K, S, Dh].

    Keys are stored transposed so that q·kᵀ is a plain batched [G, Dh] @ [Dh, S] matmul
    (with [S, Dh] keys XLA:CPU's batched dot ran 3-6× slower). One array per layer, not a
    stacked [L, ...] one, so that a decode step writes its slot in place and attention reads
    the layer's cache without slicing (copying) it out of a stack.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def from_prefill(cls, k: jax.Array, v: jax.Array, length: int) -> KVCache:
        """The cache of `length` slots holding a prefill's keys/values k, v [L, B, T, K, Dh]
        in slots 0..T-1 and zeros after them."""
        t = k.shape[2]
        if length < t:
            raise ValueError(f"cache length {length} < the {t} prefilled tokens")
        pad = length - t
        ks = tuple(
            constrain_cache(jnp.pad(k_l.transpose(0, 2, 3, 1), ((0, 0),) * 3 + ((0, pad),)))
            for k_l in k
        )
        vs = tuple(
            constrain_cache(jnp.pad(v_l.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0))))
            for v_l in v
        )
        return cls(ks, vs)

    def grow(self, length: int) -> KVCache:
        """The same cache with `length` slots, zeros in the new ones (itself when it already
        has that many)."""
        pad = length - self.k[0].shape[-1]
        if pad < 0:
            raise ValueError(f"cannot shrink a cache of {self.k[0].shape[-1]} slots to {length}")
        if pad == 0:
            return self
        ks = tuple(constrain_cache(jnp.pad(k, ((0, 0),) * 3 + ((0, pad),))) for k in self.k)
        vs = tuple(constrain_cache(jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))) for v in self.v)
        return KVCache(ks, vs)


class DecodeWeights(NamedTuple):
    """What one-token decoding reads (`Decoder.decode_weights`): per layer, a nested dict
    sliced out of the stacked [L, ...] parameters with every projection kernel transposed
    to [out, in] (`decode_layer_weights` gives its layout); the unembedding matrix [V, D]
    (the embedding itself when tied); and the RoPE tables cos, sin [Dh, N] of positions
    0..N-1, from which each step gathers its rows' columns.

    The tables are computed once, before the decode loop, because XLA fuses a cos/sin
    computed inside the step into every consumer: each layer's q and k fusions recomputed
    them per element (8× per value for q on bench-medium; in a profile the q fusions took
    1.0 ms of a 24 ms step, 0.2 ms with the tables)."""

    layers: tuple[dict, ...]
    unembed: jax.Array
    rope_cos: jax.Array
    rope_sin: jax.Array


def constrain_cache(x: jax.Array) -> jax.Array:
    """A layer's cache, k [B, K, Dh, S] or v [B, K, S, Dh]: batch and kv heads split."""
    return sharding.constrain(x, ("batch", "kv_heads", None, None))


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


def mask_bias(mask: jax.Array, copies: int, group: int) -> jax.Array:
    """mask [B, T, S] bool → additive float32 bias [B·C, T·G, S] for `Attention`'s scores
    [B·K, T·G, S] (0 where visible, a large negative number where not), each query row
    repeated for the G heads that share a kv head, in C = K copies (one per kv head) or 1
    (broadcast over them). `Decoder.hidden_states` says which, and where it is built.

    Added to the scores rather than selected with `where`: the same softmax (a fully masked
    row is uniform either way), but on XLA:CPU the broadcast select took 6× as long as the
    score matmul (bench-medium shapes), the add a fraction of it.
    """
    b, t, s = mask.shape
    bias = jnp.where(mask, 0.0, _MASK_VALUE).astype(jnp.float32)
    bias = jnp.broadcast_to(bias[:, None, :, None, :], (b, copies, t, group, s))
    return bias.reshape(b * copies, t * group, s)


def positions_from_mask(valid: jax.Array) -> jax.Array:
    """RoPE positions [B, T] that count only real tokens, so padding anywhere leaves the
    positions of the real tokens 0, 1, 2, ... (matching HF with position_ids from the mask)."""
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """y = x / sqrt(mean(x²) + ε) · w over the last axis, with the statistics in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + ε) · w, with the statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: str):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def _matmul(x, w, precision, preferred_element_type):
    """x [..., I] @ w [I, O] → [..., O]."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(
        x, w, dims, precision=precision, preferred_element_type=preferred_element_type
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_matmul(x, w, precision, preferred_element_type):
    """`_matmul` whose weight gradient XLA:CPU runs as a plain row-major GEMM.

    Autodiff's weight gradient xᵀ·dy contracts the leading (B·T) axis of both operands, a
    dot XLA:CPU hands to Eigen (~120 GFLOP/s on the benchmark host) instead of YNNPACK
    (~167). Here the smaller of x and dy is transposed into a copy first (a few % of the
    matmul's time). The optimization barriers are what keep the copy: without them XLA fuses
    the rematerialised producer of x (RMSNorm, SwiGLU) into a strided transpose, or folds
    the transpose back into the dot. The bench-medium update went from 9.24 to 8.73 s
    (interleaved A/B, 5 rounds, each faster). Same arithmetic as autodiff.
    """
    return _matmul(x, w, precision, preferred_element_type)


def _cpu_matmul_fwd(x, w, precision, preferred_element_type):
    return _matmul(x, w, precision, preferred_element_type), (x, w)


def _cpu_matmul_bwd(precision, preferred_element_type, residuals, dy):
    x, w = residuals
    barrier = jax.lax.optimization_barrier
    dx = jax.lax.dot_general(
        dy,
        w,
        (((dy.ndim - 1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if x2.shape[1] <= dy2.shape[1]:  # [I, N] @ [N, O]
        dw = _matmul(barrier(barrier(x2).T), dy2, precision, preferred_element_type)
    else:  # ([O, N] @ [N, I])ᵀ
        dw = barrier(_matmul(barrier(barrier(dy2).T), x2, precision, preferred_element_type)).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def linear_dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
):
    """`nnx.Linear`'s dot_general: `_cpu_matmul` on the CPU backend, `lax.dot_general`
    (whose autodiff GPU and TPU compilers handle well) elsewhere."""
    plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and out_sharding is None
    if plain and jax.default_backend() == "cpu":
        return _cpu_matmul(lhs, rhs, precision, preferred_element_type)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )


def _linear(cfg: ModelConfig, din: int, dout: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        dot_general=linear_dot_general,
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
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, D], bias [B·K or B, T·G, T] (`mask_bias`) → out [B, T, D] and this chunk's
        keys (after RoPE) and values k, v [B, T, K, Dh], which the sampler's prefill puts
        in its cache."""
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
        # One batch axis (B·K) for the two attention matmuls, queries of a kv head's G heads
        # side by side ([T·G] rows): XLA:CPU runs a dot with one batch dimension 2× faster
        # than with two, and either layout is a plain batched matmul on GPU/TPU.
        q = q.reshape(b, t, kh, g, dh).transpose(0, 2, 1, 3, 4).reshape(b * kh, t * g, dh)
        keys = k.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b * kh, t, dh)
        values = v.astype(cfg.dtype).transpose(0, 2, 1, 3).reshape(b * kh, t, dh)
        scores = jnp.einsum("nqd,nsd->nqs", q, keys, preferred_element_type=jnp.float32)
        scores = scores.reshape(bias.shape[0], -1, t * g, t) * dh**-0.5 + bias[:, None]
        out = softmax_attend(scores.reshape(b * kh, t * g, t), values)
        out = out.reshape(b, kh, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b * t, -1)
        out = self.o_proj(out).reshape(b, t, -1)
        return out, (k, v)


@jax.custom_vjp
def softmax_attend(scores: jax.Array, values: jax.Array) -> jax.Array:
    """softmax(scores) @ values: scores [N, Q, S] float32 (scaled and masked), values
    [N, S, Dh] → [N, Q, Dh] in values' dtype.

    The gradient is written out, flash-attention style: the backward pass recomputes the
    probabilities from the saved scores and their row max and sum, and takes the softmax's
    Jacobian-vector product as p · (dp − Σ_d dout·out), a reduction over Dh instead of
    autodiff's reduction of p · dp over S. On the bench-medium update (XLA:CPU) it ran
    2-4% faster by median over three interleaved A/Bs of 7-9 rounds (8.32 vs 8.69 s,
    8.49 vs 8.65 s, 8.13 vs 8.50 s), with slightly fewer temporaries (1.64 vs
    1.65 GiB); on bench-small the two were even within the noise. The primal is the
    forward rule's output, so log-probs taken without a gradient (behaviour, reference)
    equal those inside the update bit for bit.
    """
    return _softmax_attend_fwd(scores, values)[0]


def _softmax_probs(scores, row_max, row_sum):
    return jnp.exp(scores - row_max) / row_sum


def _softmax_attend_fwd(scores, values):
    # Max and sum kept apart, not folded into a log-sum-exp: next to a masked row's scores
    # (≈ −2.4e38) log(S) is below float32's resolution, and exp(s − lse) would sum to S.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_sum = jnp.sum(jnp.exp(scores - row_max), axis=-1, keepdims=True)
    probs = _softmax_probs(scores, row_max, row_sum).astype(values.dtype)
    out = jnp.einsum("nqs,nsd->nqd", probs, values)
    return out, (scores, row_max, row_sum, values, out)


def _softmax_attend_bwd(residuals, dout):
    scores, row_max, row_sum, values, out = residuals
    probs = _softmax_probs(scores, row_max, row_sum)
    dvalues = jnp.einsum("nqs,nqd->nsd", probs.astype(dout.dtype), dout)
    dprobs = jnp.einsum("nqd,nsd->nqs", dout, values, preferred_element_type=jnp.float32)
    row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    return (probs * (dprobs - row)).astype(scores.dtype), dvalues.astype(values.dtype)


softmax_attend.defvjp(_softmax_attend_fwd, _softmax_attend_bwd)


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

    def __call__(self, x, cos, sin, bias):
        h, kv = self.attn(self.input_norm(x), cos, sin, bias)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return sharding.constrain(x, ("batch", None, "embed")), kv


def _project(w: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """kernel @ x (+ bias) for a decode-layout kernel [..., out, in] and feature-major
    activations x [in, B] → [..., out, B]."""
    y = jnp.einsum("...oi,ib->...ob", w["kernel"], x)
    return y + w["bias"].astype(y.dtype)[..., None] if "bias" in w else y


def decode_layer_weights(cfg: ModelConfig, layer: dict) -> dict:
    """One layer's parameters (`nnx.to_pure_dict` of a `DecoderLayer`, [in, out] kernels)
    in the layout `decode_layer` reads, the kernels cast to the compute dtype:

    - attn/qkv: kernel [K, (G+2)·Dh, D] and, with qkv bias, bias [K, (G+2)·Dh]: for each kv
      head k its G query heads k·G..k·G+G-1, then its key, then its value projection;
    - attn/o_proj, mlp/down_proj: kernel [out, in];
    - mlp/gate_up: kernel [2, F, D], the gate's above the up projection's;
    - the norms' scales as they are.

    One matmul where there were three (q, k, v) and one where there were two (gate, up):
    a decode step is a chain of small ops whose count, more than their FLOPs, sets its time
    on CPU (bench-small sample 7.5% faster, interleaved A/B; bench-medium unchanged). The
    kv-head-major order keeps each kv head's projections together, so a tensor-parallel
    split of the heads still splits this kernel along its leading axis.
    """
    kh, g, dh, d = (
        cfg.num_kv_heads,
        cfg.num_heads // cfg.num_kv_heads,
        cfg.head_dim,
        cfg.hidden_size,
    )
    out_in = lambda w: w["kernel"].T.astype(cfg.dtype)
    a, m = layer["attn"], layer["mlp"]
    parts = [(a["q_proj"], g), (a["k_proj"], 1), (a["v_proj"], 1)]
    qkv = {"kernel": jnp.concatenate([out_in(w).reshape(kh, n * dh, d) for w, n in parts], 1)}
    if cfg.qkv_bias:
        qkv["bias"] = jnp.concatenate([w["bias"].reshape(kh, n * dh) for w, n in parts], 1)
    attn = {"qkv": qkv, "o_proj": {"kernel": out_in(a["o_proj"])}}
    attn |= {name: a[name] for name in ("q_norm", "k_norm") if name in a}
    mlp = {
        "gate_up": {"kernel": jnp.stack([out_in(m["gate_proj"]), out_in(m["up_proj"])])},
        "down_proj": {"kernel": out_in(m["down_proj"])},
    }
    return {
        "input_norm": layer["input_norm"],
        "post_attn_norm": layer["post_attn_norm"],
        "attn": attn,
        "mlp": mlp,
    }


def _rms_norm_features(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`rms_norm` of feature-major x [..., D, B]: the statistics over axis -2."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-2, keepdims=True) + eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)[:, None]


def _rope_features(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope` of feature-major x [n, Dh, B] by cos, sin [Dh, B]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=1)
    return (x * cos + jnp.concatenate([-x2, x1], axis=1) * sin).astype(x.dtype)


def decode_layer(
    cfg: ModelConfig,
    w: dict,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    key_mask: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slot: jax.Array | int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`DecoderLayer` for one token per row against this layer's cache: x [D, B] (feature-
    major, see below), cos, sin [Dh, B], key_mask [B, S] (the slots it may see, its own
    included), k_cache [B, K, Dh, S], v_cache [B, K, S, Dh], w one entry of
    `Decoder.decode_weights(n).layers` → x [D, B] and the caches with its key/value written
    at `slot`. The same arithmetic as the teacher-forced layer (tests/models/test_decode.py
    checks it against one full pass).

    Everything but the attention's two cache products is feature-major: every projection,
    the attention output's included, is an [out, in] @ [in, B] matmul (with 32 rows XLA:CPU
    ran that form 1.4× as fast as [B, in] @ [in, out] at bench-medium shapes, 95 → 146
    GFLOP/s for q, 103 → 140 for the MLP's gate), q, k and v in one of them and gate and up
    in another (`decode_layer_weights`), and q/k norms and RoPE work on [n, Dh, B] heads.
    The attention, whose operands are small next to the cache it reads, works per row: q, k
    and v are transposed into it, its output out of it.
    """
    b = x.shape[1]
    kh, g, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    a = w["attn"]
    h = _rms_norm_features(x, w["input_norm"]["scale"], eps).astype(cfg.dtype)
    qkv = sharding.constrain(_project(a["qkv"], h), ("kv_heads", None, "batch"))
    q = qkv[:, : g * dh].reshape(cfg.num_heads, dh, b)
    k, v = qkv[:, g * dh : (g + 1) * dh], qkv[:, (g + 1) * dh :]  # [K, Dh, B]
    if cfg.qk_norm:  # Qwen3 normalises each head before RoPE
        q = _rms_norm_features(q, a["q_norm"]["scale"], eps)
        k = _rms_norm_features(k, a["k_norm"]["scale"], eps)
    q = _rope_features(q, cos, sin).reshape(kh, g, dh, b).transpose(3, 0, 1, 2)  # [B, K, G, Dh]
    k = _rope_features(k, cos, sin).transpose(2, 0, 1)[..., None]  # [B, K, Dh, 1]
    v = v.transpose(2, 0, 1)[:, :, None]  # [B, K, 1, Dh]
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, 3)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, 2)
    k_cache, v_cache = constrain_cache(k_cache), constrain_cache(v_cache)
    scores = jnp.einsum(
        "bkgd,bkds->bkgs", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32
    )
    scores = scores * dh**-0.5
    scores = jnp.where(key_mask[:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v_cache.astype(cfg.dtype))
    # Feature-major before o_proj: as "oi,bi->ob" the product ran at half the rate.
    out = out.transpose(1, 2, 3, 0).reshape(cfg.num_heads * dh, b)
    x = x + _project(a["o_proj"], out)
    m = w["mlp"]
    h = _rms_norm_features(x, w["post_attn_norm"]["scale"], eps).astype(cfg.dtype)
    gate, up = sharding.constrain(_project(m["gate_up"], h), (None, "mlp", "batch"))
    h = jax.nn.silu(gate) * up
    x = x + _project(m["down_proj"], h)
    return sharding.constrain(x, ("embed", "batch")), k_cache, v_cache


class Decoder(nnx.Module):
    """Token ids → hidden states → logits.

    `__call__(tokens, valid)` is the plain teacher-forced forward. `hidden_states` and
    `unembed` are the two halves, used by the sampler's prefill and by the log-prob function
    (which unembeds in chunks to avoid a float32 [B, T, V] tensor); `decode_step` advances
    one token per row against a `KVCache`.
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
        self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, *, return_kv: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """tokens, positions [B, T]; mask [B, T, T] → final-normed hidden [B, T, D] and, with
        return_kv, every layer's keys (after RoPE) and values k, v [L, B, T, K, Dh]."""
        x = sharding.constrain(self.embed(tokens), ("batch", None, "embed"))
        cos, sin = rope_tables(self.cfg, positions)
        graphdef, layer_state = nnx.split(self.layers)
        # The attention mask bias (`mask_bias`). XLA:CPU is slow to broadcast it over the kv
        # heads inside the attention fusion (the forward softmax took 34 ms per layer against
        # 26 with the bias at full shape, bench-medium), so there it is built at full shape,
        # once, outside the layer loop and its remat: the update 3-6% faster, the forward
        # 7-14% (interleaved A/Bs, bench-medium and bench-small), for one more score-sized
        # array alive through the step. Elsewhere each layer builds one copy, which the
        # compiler fuses into the scores' add and remat recomputes rather than keeps.
        k, g = self.cfg.num_kv_heads, self.cfg.num_heads // self.cfg.num_kv_heads
        if jax.default_backend() == "cpu":
            full = mask_bias(mask, k, g)
            bias = lambda: full
        else:
            bias = lambda: mask_bias(mask, 1, g)

        def layer(x, state):
            x, kv = nnx.merge(graphdef, state)(x, cos, sin, bias())
            return x, (kv if return_kv else None)

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, prevent_cse=False, policy=_REMAT_POLICY[self.cfg.remat])
        if self.cfg.scan_layers:
            x, kv = jax.lax.scan(layer, x, layer_state)
        else:  # unrolled: no stacked residual buffers to fill and slice
            kvs = []
            for i in range(self.cfg.num_layers):
                x, kv = layer(x, jax.tree.map(lambda a, i=i: a[i], layer_state))
                kvs.append(kv)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if return_kv else None
        return self.final_norm(x), kv

    def decode_weights(self, num_positions: int) -> DecodeWeights:
        """The weights in decode layout (`DecodeWeights`), cast to the compute dtype, with
        RoPE tables for positions 0..num_positions-1 (a decode step at a position past them
        gets NaN logits).

        The sampler computes them once, before its decode loop: slices taken inside the loop
        were recomputed at every token. Its kernels, [out, in] and the q/k/v and gate/up
        projections joined (`decode_layer_weights`), are what the feature-major decode step
        multiplies from the left (`decode_layer`).
        """
        state = nnx.to_pure_dict(nnx.state(self.layers))
        layers = tuple(
            decode_layer_weights(self.cfg, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.cfg.num_layers)
        )
        cos, sin = rope_tables(self.cfg, jnp.arange(num_positions)[None])
        return DecodeWeights(layers, self.unembed_matrix().T, cos[0].T, sin[0].T)

    def decode_step(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        key_mask: jax.Array,
        cache: KVCache,
        slot: jax.Array | int,
        weights: DecodeWeights,
    ) -> tuple[jax.Array, KVCache]:
        """One token per row: tokens, positions [B] int, written at cache slot `slot`;
        key_mask [B, S] marks the slots it attends to (its own included); weights from
        `decode_weights(n)` with n > every position → float32 logits [B, V] of the next
        token and the updated cache.
        The layers are unrolled (module docstring), the activations feature-major
        (`decode_layer`)."""
        x = sharding.constrain(self.embed(tokens).T, ("embed", "batch"))
        cos = jnp.take(weights.rope_cos, positions, axis=1, mode="fill", fill_value=jnp.nan)
        sin = jnp.take(weights.rope_sin, positions, axis=1, mode="fill", fill_value=jnp.nan)
        ks, vs = [], []
        for w, k, v in zip(weights.layers, cache.k, cache.v, strict=True):
            x, k, v = decode_layer(self.cfg, w, x, cos, sin, key_mask, k, v, slot)
            ks.append(k)
            vs.append(v)
        final = self.final_norm
        h = _rms_norm_features(x, final.scale[...], final.eps).astype(self.cfg.dtype)
        logits = jnp.einsum("vd,db->vb", weights.unembed, h, preferred_element_type=jnp.float32)
        # The barrier keeps XLA from folding the transpose into the dot, which turned it
        # into a 3× slower [B, D] @ [D, V] one; transposing the logits costs far less.
        return jax.lax.optimization_barrier(logits).T, KVCache(tuple(ks), tuple(vs))

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
