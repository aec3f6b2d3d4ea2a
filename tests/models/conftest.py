"""Tiny random HF checkpoints (config.json + safetensors + tokenizer.json) built in-process
with transformers, the reference implementation the parity tests compare against."""

import json
import os

import pytest

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "qwen2": dict(rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(rope_theta=1e6, tie_word_embeddings=False),
    # Llama 3.1 RoPE scaling with wavelengths (head_dim 16, θ 5e5) on both sides of the
    # band [16, 64], so the scaled, interpolated and unscaled branches all take part.
    "llama": dict(
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_scaling=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}


def hf_model(family: str, seed: int = 0):
    """A random transformers model of `family` with every weight perturbed (HF initialises
    biases to 0 and norms to 1, which would hide loading mistakes)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    kwargs = dict(TINY, **FAMILIES[family])
    if "rope_scaling" in kwargs:  # transformers ≥ 5 reads RoPE settings from rope_parameters
        kwargs["rope_parameters"] = kwargs.pop("rope_scaling")
    elif "rope_theta" in kwargs:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
    config = transformers.AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer.json over `vocab_size` ids: <pad>, <bos>, <eos>, then w3, w4..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}, f)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family → (directory of a saved tiny random checkpoint, the transformers model)."""
    cache = {}

    def make(family: str):
        if family not in cache:
            model = hf_model(family)
            path = str(tmp_path_factory.mktemp(f"hf_{family}"))
            model.save_pretrained(path, safe_serialization=True)
            write_tokenizer(path, TINY["vocab_size"])
            cache[family] = (path, model)
        return cache[family]

    return make
