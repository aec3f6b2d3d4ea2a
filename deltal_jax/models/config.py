"""Decoder configuration, presets named after public checkpoints, and HF `config.json` I/O.

One config covers the three families; they differ only in a few switches:

| family     | qkv bias | q/k RMSNorm | RoPE                      |
|------------|----------|-------------|---------------------------|
| qwen2      | yes      | no          | θ = 1e6                   |
| qwen3      | no       | yes         | θ = 1e6                   |
| llama      | no       | no          | θ = 5e5, llama3 scaling   |
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
REMAT_POLICIES = ("none", "dots", "projections", "full")  # ModelConfig.remat


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` is the storage
    dtype of the parameters. Softmax, RMSNorm statistics and log-probs are always float32.
    """

    model_type: str  # one of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 1e6
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    # What the backward pass recomputes of each layer (REMAT_POLICIES): "projections" saves
    # the outputs of the weight matmuls and recomputes the rest (norms, RoPE, attention's
    # two products and softmax, SwiGLU); "dots" also saves the attention scores and output;
    # "full" saves only the layer's input; "none" saves whatever autodiff keeps.
    remat: str = "projections"
    scan_layers: bool = True  # lax.scan over the layers (False: unrolled, compiles slower)

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; accepted: {', '.join(REMAT_POLICIES)}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type={self.model_type!r}; accepted: {sorted(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def replace(self, **kwargs: Any) -> ModelConfig:
        return dataclasses.replace(self, **kwargs)

    def num_params(self) -> int:
        """Parameter count, embeddings included (counted once when tied)."""
        d, h, kv, hd, f = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.mlp_dim,
        )
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += hd * (h + 2 * kv) if self.qkv_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d


def _qwen2(**kw: Any) -> ModelConfig:
    return ModelConfig(model_type="qwen2", qkv_bias=True, rope_theta=1e6, **kw)


def _qwen3(**kw: Any) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", qk_norm=True, rope_theta=1e6, head_dim=128, vocab_size=151936, **kw
    )


# Shapes from the public config.json of each checkpoint.
PRESETS: dict[str, ModelConfig] = {
    "tiny": _qwen2(
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        tie_embeddings=True,
    ),
    "bench-small": _qwen2(
        vocab_size=1024,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=1024,
        tie_embeddings=True,
    ),
    "bench-medium": _qwen2(
        vocab_size=8192,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        mlp_dim=2048,
        tie_embeddings=True,
    ),
    "qwen2.5-0.5b": _qwen2(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=4864,
        tie_embeddings=True,
        eos_token_id=(151643,),
    ),
    "qwen2.5-1.5b": _qwen2(
        vocab_size=151936,
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        mlp_dim=8960,
        tie_embeddings=True,
        eos_token_id=(151643,),
    ),
    "qwen2.5-3b": _qwen2(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        head_dim=128,
        mlp_dim=11008,
        tie_embeddings=True,
        eos_token_id=(151643,),
    ),
    "qwen2.5-7b": _qwen2(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        mlp_dim=18944,
        tie_embeddings=False,
        eos_token_id=(151643,),
    ),
    "qwen3-0.6b": _qwen3(
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        mlp_dim=3072,
        tie_embeddings=True,
        eos_token_id=(151643,),
    ),
    "qwen3-1.7b": _qwen3(
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        mlp_dim=6144,
        tie_embeddings=True,
        eos_token_id=(151643,),
    ),
    "qwen3-4b": _qwen3(
        hidden_size=2560,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=9728,
        tie_embeddings=True,
        eos_token_id=(151643,),
    ),
    "qwen3-8b": _qwen3(
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=12288,
        tie_embeddings=False,
        eos_token_id=(151643,),
    ),
    "llama-3.1-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001,),
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, e.g. `get_preset("qwen2.5-3b", dtype="bfloat16", remat="full")`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; accepted: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE θ and scaling from either HF layout: `rope_theta` + `rope_scaling` (checkpoints
    saved before transformers 5) or a single `rope_parameters` dict (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope type {rope_type!r}; accepted: 'default', 'llama3'")


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """A ModelConfig from the contents of an HF `config.json`."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture model_type={model_type!r} "
            f"(architectures={hf.get('architectures')}); accepted: {sorted(ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    if hf.get("use_sliding_window") or hf.get("mlp_bias"):
        raise ValueError("sliding-window attention and MLP biases are not supported")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise ValueError("attention_bias=true (bias on o_proj) is not supported")
    theta, scaling = _rope_from_hf(hf)
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    num_heads = hf["num_attention_heads"]
    kwargs = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The HF `config.json` contents for `cfg` (both RoPE layouts written, so transformers 4
    and 5 read it)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            **dataclasses.asdict(cfg.rope_scaling),
        }
    eos = list(cfg.eos_token_id)
    return {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling is not None else None,
        "rope_parameters": rope,
        "attention_bias": cfg.qkv_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
