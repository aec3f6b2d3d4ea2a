"""Sampler: behaviour log-probs, EOS/truncation bookkeeping, filters, HF greedy parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltal_jax import sharding
from deltal_jax.models import get_preset, init_model, load_model, response_logprobs
from deltal_jax.sampling import (
    SamplingConfig,
    block_size,
    categorical_two_level,
    filter_logits,
    generate,
    phase_ends,
)

CFG = get_preset("tiny")
P, M, B = 8, 12, 4


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, (B, P)).astype(np.int32)
    mask = np.ones((B, P), bool)
    mask[1, :3] = False  # left padding
    mask[2, 5:] = False  # right padding: the sampler must read the last real slot
    return jnp.asarray(tokens), jnp.asarray(mask)


def _greedy(model, prompts, m=M, eos=()):
    config = SamplingConfig(max_new_tokens=m, greedy=True, eos_ids=eos, pad_id=0)
    return generate(model, *prompts, jax.random.key(0), config)


def test_behaviour_logprobs_equal_teacher_forced_logprobs(model, prompts):
    config = SamplingConfig(max_new_tokens=M, temperature=0.7, eos_ids=(5, 9, 17), pad_id=0)
    out = generate(model, *prompts, jax.random.key(1), config)
    assert out.mask.sum() > B  # responses are not trivially short
    tf = response_logprobs(model, *prompts, out.tokens, out.mask, temperature=0.7, chunk_size=5)
    np.testing.assert_allclose(out.logprobs, tf.logp, atol=2e-5)
    ratio = jnp.exp(tf.logp - out.logprobs)[out.mask]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


def test_same_key_same_sample_other_key_other_sample(model, prompts):
    config = SamplingConfig(max_new_tokens=M)
    a = generate(model, *prompts, jax.random.key(7), config)
    b = generate(model, *prompts, jax.random.key(7), config)
    c = generate(model, *prompts, jax.random.key(8), config)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_top_k_1_is_greedy(model, prompts):
    greedy = _greedy(model, prompts)
    top1 = generate(model, *prompts, jax.random.key(5), SamplingConfig(max_new_tokens=M, top_k=1))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)  # a point mass


def test_eos_stops_each_row_and_pads_after_it(model, prompts):
    free = np.asarray(_greedy(model, prompts).tokens)  # no EOS: every row runs to M
    # Stop on the token row 0 emits at step 4; each row must stop at its first occurrence.
    eos = int(free[0, 4])
    out = _greedy(model, prompts, eos=(eos,))
    for row, seq in enumerate(free):
        hits = np.flatnonzero(seq == eos)
        length = hits[0] + 1 if hits.size else M
        assert out.lengths[row] == length
        assert bool(out.truncated[row]) == (hits.size == 0)
        np.testing.assert_array_equal(out.tokens[row, :length], seq[:length])
        np.testing.assert_array_equal(out.tokens[row, length:], 0)
        np.testing.assert_array_equal(out.mask[row], np.arange(M) < length)
        assert np.all(out.logprobs[row, length:] == 0)


def test_all_rows_done_exits_early_with_the_same_result(model, prompts):
    free = np.asarray(_greedy(model, prompts).tokens)
    eos = tuple(int(t) for t in free[:, 1])  # every row stops at its second token
    out = _greedy(model, prompts, eos=eos)
    assert np.all(np.asarray(out.lengths) <= 2) and not np.any(out.truncated)
    np.testing.assert_array_equal(out.tokens[:, 2:], 0)
    truncated = _greedy(model, prompts, m=3)
    assert np.all(truncated.truncated) and np.all(truncated.lengths == 3)


@pytest.mark.parametrize("m,phases,ends", [(12, 4, [3, 6, 9, 12]), (10, 3, [4, 7, 10]),
                                           (2, 4, [1, 2]), (5, 1, [5])])  # fmt: skip
def test_phase_ends_split_the_response_evenly(m, phases, ends):
    assert phase_ends(m, phases) == ends


@pytest.mark.parametrize("eos", [(), (5, 9, 17)])
def test_cache_phases_do_not_change_the_sample(model, prompts, eos):
    """Phases change only how long the cache is while a token is fed, never what it sees:
    the same draws with one phase (the whole P + M cache throughout) and with several."""
    outs = [
        generate(
            model,
            *prompts,
            jax.random.key(4),
            SamplingConfig(max_new_tokens=M, eos_ids=eos, cache_phases=n),
        )  # fmt: skip
        for n in (1, 3, M)
    ]
    for out in outs[1:]:
        np.testing.assert_array_equal(out.tokens, outs[0].tokens)
        np.testing.assert_array_equal(out.lengths, outs[0].lengths)
        np.testing.assert_allclose(out.logprobs, outs[0].logprobs, atol=1e-6)


def test_bad_sampling_config_is_rejected():
    with pytest.raises(ValueError, match="cache_phases=0; must be ≥ 1"):
        SamplingConfig(max_new_tokens=4, cache_phases=0)


def test_filter_logits_matches_numpy_top_k_top_p():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.3, 0.1, 0.3, 0.2, 0.1]]))
    # Row 0: top-4 drops .05; renormalised by .95, the mass before .15 is .737 < .75 and
    # before .1 is .895 → keep {.4, .3, .15}. Row 1: both .1 tie at the 4th value and pass
    # top-4, then the mass before them is .8 → keep {.3, .3, .2}.
    keep = np.array([[0, 1, 0, 1, 1], [1, 0, 1, 1, 0]], bool)
    got = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(1, top_k=4, top_p=0.75)))
    p = np.where(keep, np.exp(logits), 0)
    np.testing.assert_allclose(got[keep], np.log((p / p.sum(-1, keepdims=True))[keep]), rtol=1e-5)
    assert np.all(np.isneginf(got[~keep]))
    ties = np.asarray(filter_logits(jnp.asarray(logits[1:]), SamplingConfig(1, top_k=4)))
    np.testing.assert_allclose(ties, logits[1:], rtol=1e-5)  # nothing removed, nothing moved


@pytest.mark.parametrize(("vocab", "c"), [(1, 1), (96, 16), (1024, 32), (8192, 128), (151936, 512)])
def test_block_size_is_the_power_of_two_at_or_above_sqrt_vocab(vocab, c):
    assert block_size(vocab) == c


def test_two_level_categorical_draws_each_token_with_its_probability():
    """Empirical frequencies of 60,000 draws against p: V = 200 is cut into 13 blocks of 16
    (the last padded), 30 tokens are filtered out (−inf) and one block is empty."""
    v, n = 200, 60_000
    rng = np.random.default_rng(0)
    logits = 1.5 * rng.standard_normal(v)
    logits[rng.choice(v, 30, replace=False)] = -np.inf
    logits[32:48] = -np.inf  # block 2
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    # Unnormalised logits (shifted by 7): the draw does not depend on the shift, and the
    # log-normaliser it returns is the shift back.
    draws, log_normaliser = jax.jit(categorical_two_level)(
        jax.random.key(0), jnp.broadcast_to(logp + 7.0, (n, v))
    )
    np.testing.assert_allclose(log_normaliser, 7.0, atol=1e-5)
    draws = np.asarray(draws)
    assert draws.min() >= 0 and draws.max() < v
    p = np.exp(np.asarray(logp, np.float64))
    counts = np.bincount(draws, minlength=v)
    assert np.all(counts[p == 0] == 0)
    # Pearson χ² over the 170 possible tokens: 169 degrees of freedom, mean 169, sd 18.4.
    kept = p > 0
    chi2 = np.sum((counts[kept] - n * p[kept]) ** 2 / (n * p[kept]))
    assert chi2 < 169 + 5 * 18.4
    # The bound has power: a sampler that picked the block uniformly (ignoring the block
    # masses) would be expected to score far above it.
    block_mass = np.pad(p, (0, 8)).reshape(13, 16).sum(-1)
    mass_of_block = np.repeat(block_mass, 16)[:v]
    wrong = np.divide(p, mass_of_block, out=np.zeros(v), where=mass_of_block > 0)
    wrong /= np.count_nonzero(block_mass)
    assert n * np.sum((wrong[kept] - p[kept]) ** 2 / p[kept]) > 10 * (169 + 5 * 18.4)


def test_sharded_params_and_batch_give_the_same_sample(model, prompts):
    config = SamplingConfig(max_new_tokens=M, temperature=0.9, top_k=20, eos_ids=(5,))
    expected = generate(model, *prompts, jax.random.key(2), config)
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = sharding.shard_model(init_model(CFG, seed=3), mesh)
    with jax.set_mesh(mesh):
        got = generate(sharded, *sharding.shard_batch(prompts, mesh), jax.random.key(2), config)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)


def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)  # spread logits so greedy has no near-ties
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 96, (3, 6))
    mask = np.ones_like(tokens, bool)
    mask[1, :2] = False
    tokens[~mask] = 0
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, tokens.shape[1] :].numpy()
    out = generate(
        ours,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(0),
        SamplingConfig(max_new_tokens=16, greedy=True),
    )
    np.testing.assert_array_equal(out.tokens, ref)
