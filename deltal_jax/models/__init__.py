"""Decoder-only language models (Qwen2/2.5, Qwen3, Llama 3/3.1) in Flax NNX.

model = init_model(get_preset("tiny"), seed=0, mesh=mesh)        # random weights
model, cfg = load_model("/ckpt/Qwen2.5-3B", mesh=mesh, dtype="bfloat16")
logits = model(tokens, valid)                                     # [B, T, V] float32
logp, entropy = response_logprobs(model, prompt, prompt_mask, response, response_mask)
save_model(model, "/out/policy")
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from deltal_jax import sharding
from deltal_jax.models.config import (
    PRESETS,
    Llama3RopeScaling,
    ModelConfig,
    from_hf_config,
    get_preset,
    to_hf_config,
)
from deltal_jax.models.hf import load_config, load_model, save_model
from deltal_jax.models.logprobs import TokenLogProbs, response_logprobs
from deltal_jax.models.tokenizer import Tokenizer, load_tokenizer
from deltal_jax.models.transformer import (
    Decoder,
    KVCache,
    attention_mask,
    positions_from_mask,
)


def init_model(cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Decoder:
    """A randomly initialised Decoder; with a mesh, each parameter is created directly in its
    sharded layout (initialisation is jitted with out_shardings), never whole on one device."""
    if mesh is None:
        return Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))
    shardings = sharding.param_shardings(abstract, mesh)
    init = jax.jit(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed))), out_shardings=shardings)
    return nnx.merge(graphdef, init())


__all__ = [
    "PRESETS",
    "Decoder",
    "KVCache",
    "Llama3RopeScaling",
    "ModelConfig",
    "TokenLogProbs",
    "Tokenizer",
    "attention_mask",
    "from_hf_config",
    "get_preset",
    "init_model",
    "load_config",
    "load_model",
    "load_tokenizer",
    "positions_from_mask",
    "response_logprobs",
    "save_model",
    "to_hf_config",
]
