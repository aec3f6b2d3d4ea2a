"""Per-token log-probabilities and entropies of response tokens under the model.

The vocabulary of real models is large (152k for Qwen), so a float32 [B, M, V] logits
tensor and its gradient would dominate memory. The unembedding, log-softmax and gather run
over chunks of the response under `jax.checkpoint`: the forward keeps only [B, C, V] alive
at a time and the backward recomputes each chunk's logits instead of storing them (a
response that fits in one chunk is not recomputed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deltal_jax.models.transformer import Decoder, attention_mask, positions_from_mask


class TokenLogProbs(NamedTuple):
    """logp [B, M]: log π(y_t | x, y_<t); entropy [B, M]: H(π(· | x, y_<t)).
    Both are 0 where the response mask is 0."""

    logp: jax.Array
    entropy: jax.Array


def _chunk_stats(
    hidden: jax.Array, targets: jax.Array, w: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """hidden [B, C, D], targets [B, C], w [D, V] → logp, entropy [B, C] in float32."""
    logits = jnp.einsum("bcd,dv->bcv", hidden, w, preferred_element_type=jnp.float32)
    logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # H = lse − Σ_v p_v z_v with p = softmax(z).
    entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
    return target_logits - lse, entropy


def response_logprobs(
    model: Decoder,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> TokenLogProbs:
    """Teacher-forced log-probs of response_tokens [B, M] after prompt_tokens [B, P].

    Prompts may be padded on either side (prompt_mask [B, P] marks real tokens); responses are
    right-padded (response_mask [B, M]). `temperature` divides the logits, as the sampler
    does, so log-probs of a tempered behaviour policy can be reproduced exactly.
    `chunk_size` bounds the float32 logits alive at once to [B, chunk_size, V].
    """
    b, p = prompt_tokens.shape
    m = response_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)  # [B, P+M]
    valid = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(bool)
    mask = attention_mask(jnp.arange(p + m), valid)
    hidden, _ = model.hidden_states(tokens, positions_from_mask(valid), mask)

    # The first response token is predicted from the last real prompt token, token t > 0
    # from the slot just before it.
    last_prompt = p - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)  # [B]
    slots = jnp.concatenate(
        [last_prompt[:, None], jnp.broadcast_to(jnp.arange(p, p + m - 1), (b, m - 1))], axis=1
    )
    hidden = jnp.take_along_axis(hidden, slots[..., None], axis=1)  # [B, M, D]

    chunk = min(chunk_size, m)
    n_chunks = -(-m // chunk)
    pad = n_chunks * chunk - m
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(response_tokens, ((0, 0), (0, pad)))
    # [n, B, C, ...] so lax.map walks the chunks.
    hidden = hidden.reshape(b, n_chunks, chunk, -1).swapaxes(0, 1)
    targets = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)
    w = model.unembed_matrix()
    # Recomputing the logits in the backward pass only saves memory when there are several
    # chunks; for one chunk it would cost a second [B·M, D] x [D, V] matmul for nothing.
    stats = _chunk_stats
    if n_chunks > 1:
        stats = jax.checkpoint(_chunk_stats, static_argnums=(3,), prevent_cse=False)
    logp, entropy = jax.lax.map(lambda xs: stats(*xs, w, temperature), (hidden, targets))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :m]
    keep = response_mask.astype(bool)
    return TokenLogProbs(
        logp=jnp.where(keep, unchunk(logp), 0.0), entropy=jnp.where(keep, unchunk(entropy), 0.0)
    )
