"""Chunked response log-probs equal the full log-softmax computed directly from logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltal_jax.models import get_preset, init_model, response_logprobs

CFG = get_preset("tiny")
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _direct(model, prompt, prompt_mask, response, response_mask, temperature):
    """Reference: full [B, P+M, V] logits, log-softmax, gather; one row at a time, unpadded."""
    logp, entropy = [], []
    for i in range(prompt.shape[0]):
        seq = jnp.concatenate([prompt[i][prompt_mask[i]], response[i]])[None]
        logits = _forward(model, seq)[0, -response.shape[1] - 1 : -1] / temperature  # [M, V]
        lp = jax.nn.log_softmax(logits)
        logp.append(jnp.take_along_axis(lp, response[i][:, None], axis=1)[:, 0])
        entropy.append(-jnp.sum(jnp.exp(lp) * lp, axis=-1))
    keep = response_mask
    return jnp.where(keep, jnp.stack(logp), 0), jnp.where(keep, jnp.stack(entropy), 0)


@pytest.mark.parametrize("chunk_size", [3, 16])  # ragged last chunk; a single chunk
def test_chunked_logprobs_and_entropy_equal_direct_computation(chunk_size):
    model = init_model(CFG, seed=0)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 5)))
    prompt_mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    response = jnp.asarray(rng.integers(0, CFG.vocab_size, (3, 7)))
    response_mask = jnp.arange(7)[None] < jnp.asarray([[7], [4], [1]])
    got = nnx.jit(response_logprobs, static_argnames=("temperature", "chunk_size"))(
        model,
        prompt,
        prompt_mask,
        response,
        response_mask,
        temperature=0.8,
        chunk_size=chunk_size,
    )
    logp, entropy = _direct(model, prompt, prompt_mask, response, response_mask, 0.8)
    np.testing.assert_allclose(got.logp, logp, atol=2e-5)
    np.testing.assert_allclose(got.entropy, entropy, atol=2e-5)


def test_chunking_does_not_change_gradients():
    model = init_model(CFG, seed=0)
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 4)))
    response = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 9)))
    ones = lambda x: jnp.ones(x.shape, bool)
    weights = jnp.asarray(rng.normal(size=(2, 9)))

    def loss(model, chunk_size):
        out = response_logprobs(
            model, prompt, ones(prompt), response, ones(response), chunk_size=chunk_size
        )
        return jnp.sum(weights * out.logp) + jnp.sum(out.entropy)

    grad = nnx.jit(nnx.grad(loss), static_argnums=1)
    chunked, whole = grad(model, 2), grad(model, 9)
    for (path, a), (_, b) in zip(nnx.to_flat_state(chunked), nnx.to_flat_state(whole), strict=True):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, err_msg=str(path))
