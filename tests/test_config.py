"""Start-up validation: each bad config fails with a message naming the field and the fix."""

import importlib
import os
import sys

import pytest

from deltal_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_override(path: str, value):
    config = config_lib.base_config()
    *groups, field = path.split(".")
    node = config
    for group in groups:
        node = node[group]
    node[field] = value
    return config


BAD = [
    ("loss.aggregation", "mean", r"Unknown loss aggregation mode 'mean'\. Accepted: token-mean"),
    ("loss.alpha", 1.5, r"alpha must be in \[0, 1\], got 1\.5"),
    ("loss.scope", "prompt", r"scope must be one of \('batch', 'group'\)"),
    ("loss.variant", "trpo", r"config\.loss\.variant='trpo' is invalid; accepted: ppo, gspo"),
    ("loss.clip_ratio_c", 0.5, r"loss\.clip_ratio_c=0\.5 .* a number > 1, or 0 to disable"),
    ("loss.entropy_aggregation", "sum", r"config\.loss\.entropy_aggregation: Unknown loss"),
    ("advantage.estimator", "ppo", r"advantage\.estimator='ppo' .* grpo, mean_only, rloo"),
    ("advantage.estimator", "spo", r"spo one response per prompt"),
    ("kl.estimator", "k4", r"Unknown KL estimator 'k4'\. Accepted: k1, k2, k3"),
    ("kl.placement", "advantage", r"Unknown KL placement 'advantage'"),
    ("model.preset", "gpt5", r"model\.preset='gpt5' is invalid; accepted: countdown-tiny, "),
    ("model.dtype", "float64", r"model\.dtype='float64' .* float32, bfloat16, float16"),
    (
        "model.remat",
        "some",
        r"model\.remat='some' is invalid; accepted: none, dots, projections, full",
    ),
    ("data.task", "chess", r"data\.task='chess' .* countdown, math, gsm8k"),
    ("data.template", "chat-ml", r"data\.template='chat-ml' .* compact, base, chat"),
    ("warmup.solution_format", "cot", r"warmup\.solution_format='cot' .* steps, answer"),
    ("rollout.group_size", 0, r"rollout\.group_size=0 is invalid; accepted: a number > 0"),
    ("rollout.max_response_len", -3, r"max_response_len=-3 is invalid"),
    ("rollout.top_p", 1.5, r"rollout\.top_p=1\.5 .* a number in \(0, 1\]"),
    ("rollout.cache_phases", 0, r"rollout\.cache_phases=0 is invalid; accepted: a number > 0"),
    ("ppo.minibatches", 3, r"ppo\.minibatches=3 .* a divisor of prompts_per_step × group_size"),
    ("ppo.microbatch_size", 48, r"ppo\.microbatch_size=48 .* a divisor of the mini-batch size"),
    ("optim.schedule", "step", r"optim\.schedule='step' .* constant, cosine, linear"),
    ("optim.learning_rate", 0.0, r"optim\.learning_rate=0\.0 is invalid; accepted: a number > 0"),
    ("reward.overlong_buffer", 99, r"reward\.overlong_buffer=99 .* at most"),
    ("loss.alpah", 0.5, r"config\.loss\.alpah=0\.5 is invalid; accepted: fields of config\.loss"),
]


@pytest.mark.parametrize("path,value,match", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_config_is_rejected_with_a_clear_message(path, value, match):
    config = with_override(path, value)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(config)


def test_math_task_needs_a_jsonl_file():
    config = with_override("data.task", "math")
    config.data.template = "base"
    with pytest.raises(config_lib.ConfigError, match=r"data\.jsonl_train='' .* JSONL file"):
        config_lib.validate(config)


def test_kl_correction_with_reward_placement_is_rejected():
    config = with_override("kl.off_policy_correction", True)
    with pytest.raises(config_lib.ConfigError, match="applies to a loss-placed estimator"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "name,presets",
    [
        ("countdown_tiny", (None, "smoke", "toy")),
        ("paper_countdown_qwen25_3b", (None, "grpo", "dapo", "dr_grpo", "dapo_recipe")),
        ("paper_math_qwen25_7b", (None, "grpo", "dapo", "dr_grpo")),
    ],
)
def test_shipped_configs_validate(name, presets):
    sys.path.insert(0, REPO)
    module = importlib.import_module(f"configs.{name}")
    for preset in presets:
        config_lib.validate(module.get_config(preset))
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        module.get_config("huge")


def test_paper_recipes_follow_the_reference_hyperparameters():
    sys.path.insert(0, REPO)
    countdown = importlib.import_module("configs.paper_countdown_qwen25_3b").get_config()
    math = importlib.import_module("configs.paper_math_qwen25_7b").get_config()
    for c in (countdown, math):
        assert (c.rollout.prompts_per_step, c.rollout.group_size) == (128, 10)
        assert c.rollout.prompts_per_step // c.ppo.minibatches == 32  # prompts per update
        assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip) == (1e-6, 0.01, 1)
        assert (c.loss.eps_low, c.loss.eps_high, c.kl.beta) == (0.2, 0.3, 0.0)
        assert c.data.template == "base" and c.eval.num_samples == 8
    assert (countdown.loss.alpha, math.loss.alpha) == (1.0, 0.75)
    assert countdown.model.preset == "qwen2.5-3b" and math.model.preset == "qwen2.5-7b"
