"""HF import/export: logit parity with transformers, round trips, sharded loading, errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltal_jax import sharding
from deltal_jax.models import get_preset, init_model, load_config, load_model, save_model
from deltal_jax.models.hf import INDEX_FILE, SINGLE_FILE
from deltal_jax.models.tokenizer import load_tokenizer

torch = pytest.importorskip("torch")

FAMILIES = ["qwen2", "qwen3", "llama"]


def _flat(model) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, k)): np.asarray(v[...])
        for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _hf_logits(hf, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_and_without_padding(hf_checkpoint, family):
    path, hf = hf_checkpoint(family)
    model, cfg = load_model(path)
    assert cfg.model_type == family
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (3, 80))
    valid = np.ones_like(tokens, bool)
    valid[1, :7] = False  # left padding
    valid[2, 60:] = False  # right padding
    ref = _hf_logits(hf, tokens, valid)
    got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(valid)))
    np.testing.assert_allclose(got[valid], ref[valid], atol=5e-5, rtol=0)


def test_llama3_rope_scaling_changes_logits(hf_checkpoint):
    """The parity test above would pass with the scaling ignored if it had no effect."""
    path, _ = hf_checkpoint("llama")
    model, _ = load_model(path)
    unscaled, _ = load_model(path, rope_scaling=None)
    tokens = jnp.arange(80)[None] % 90 + 3
    assert float(jnp.abs(model(tokens) - unscaled(tokens)).max()) > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied and untied embeddings
def test_import_export_import_is_identical(hf_checkpoint, family, tmp_path):
    path, _ = hf_checkpoint(family)
    model, _ = load_model(path)
    save_model(model, tmp_path)
    again, _ = load_model(tmp_path)
    a, b = _flat(model), _flat(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The exported directory is also a valid transformers checkpoint.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tokens = np.arange(3, 40)[None]
    np.testing.assert_allclose(
        _hf_logits(hf, tokens, np.ones_like(tokens, bool)),
        np.asarray(model(jnp.asarray(tokens))),
        atol=5e-5,
    )


def test_sharded_checkpoint_loads_like_a_single_file(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen3")
    model, _ = load_model(path)
    save_model(model, tmp_path, max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) > 2 and not os.path.exists(tmp_path / SINGLE_FILE)
    with open(tmp_path / INDEX_FILE) as f:
        assert set(json.load(f)["weight_map"].values()) == set(files)
    again, _ = load_model(tmp_path)
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(v, _flat(again)[k], err_msg=k)


def test_loads_directly_into_the_mesh_layout(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    mesh = sharding.make_mesh((2, 2, 2))
    model, _ = load_model(path, mesh=mesh)
    reference, _ = load_model(path)
    state = nnx.state(model, nnx.Param)
    q = state["layers"]["attn"]["q_proj"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 32)  # [L, D/2, H·Dh/2]
    for k, v in _flat(reference).items():
        np.testing.assert_array_equal(v, _flat(model)[k], err_msg=k)


def test_bfloat16_export_halves_the_file_and_round_trips(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2")
    model, _ = load_model(path)
    save_model(model, tmp_path, dtype="bfloat16")
    assert os.path.getsize(tmp_path / SINGLE_FILE) < 0.55 * os.path.getsize(
        os.path.join(path, SINGLE_FILE)
    )
    again, _ = load_model(tmp_path)
    for k, v in _flat(model).items():
        expected = v.astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(expected, _flat(again)[k], err_msg=k)


def test_clear_errors(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)

    bad = tmp_path / "unknown"
    shutil.copytree(path, bad)
    with open(bad / "config.json") as f:
        cfg = json.load(f)
    with open(bad / "config.json", "w") as f:
        json.dump(dict(cfg, model_type="gpt2"), f)
    with pytest.raises(ValueError, match="unknown architecture.*gpt2"):
        load_model(bad)

    wrong = tmp_path / "wrong"
    shutil.copytree(path, wrong)
    with open(wrong / "config.json", "w") as f:
        json.dump(dict(cfg, intermediate_size=cfg["intermediate_size"] + 8), f)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape"):
        load_model(wrong)

    os.remove(wrong / SINGLE_FILE)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(wrong)

    missing = tmp_path / "missing"
    missing.mkdir()
    save_model(init_model(get_preset("tiny", tie_embeddings=False)), missing)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(missing / SINGLE_FILE)
    del tensors["lm_head.weight"]
    save_file(tensors, missing / SINGLE_FILE)
    with pytest.raises(KeyError, match="lm_head.weight"):
        load_model(missing)


def test_tokenizer_special_ids_and_left_padding(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    tok = load_tokenizer(path)
    assert (tok.eos_ids, tok.pad_id, tok.bos_id) == ((2,), 0, 1)
    ids = tok.encode("w5 w7 w9")
    assert ids == [5, 7, 9] and tok.decode([*ids, 2]) == "w5 w7 w9"
    tokens, mask = tok.pad_prompts([ids, [4]], 4)
    np.testing.assert_array_equal(tokens, [[0, 5, 7, 9], [0, 0, 0, 4]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="max_prompt_len"):
        tok.pad_prompts([ids], 2)
    assert load_tokenizer(path, pad_token="<eos>").pad_id == 2
