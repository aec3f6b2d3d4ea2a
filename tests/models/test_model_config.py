"""Presets have the published parameter counts; HF config.json round-trips."""

import pytest

from deltal_jax.models import PRESETS, from_hf_config, get_preset, to_hf_config


@pytest.mark.parametrize(
    "name, billions",  # the counts published on the checkpoints' model cards
    [
        ("qwen2.5-0.5b", 0.49),
        ("qwen2.5-1.5b", 1.54),
        ("qwen2.5-3b", 3.09),
        ("qwen2.5-7b", 7.62),
        ("qwen3-0.6b", 0.60),
        ("qwen3-1.7b", 1.72),
        ("qwen3-4b", 4.02),
        ("qwen3-8b", 8.19),
        ("llama-3.1-8b", 8.03),
    ],
)
def test_preset_parameter_counts_match_the_model_cards(name, billions):
    assert get_preset(name).num_params() / 1e9 == pytest.approx(billions, abs=0.006)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    cfg = PRESETS[name]
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_transformers_4_rope_layout_and_clear_errors():
    hf = to_hf_config(PRESETS["llama-3.1-8b"])
    del hf["rope_parameters"]  # older checkpoints: rope_theta + rope_scaling{"rope_type"}
    assert from_hf_config(hf) == PRESETS["llama-3.1-8b"]
    with pytest.raises(ValueError, match="unknown architecture.*mistral"):
        from_hf_config(dict(hf, model_type="mistral"))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        from_hf_config(dict(hf, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
        get_preset("qwen9")
