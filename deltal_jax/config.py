"""The run configuration: every field with its default, and start-up validation.

`base_config()` is the complete schema; its defaults are the small CPU run
(`configs/countdown_tiny.py`). Config files start from it and override what they need;
`--config.loss.alpha=0.5` overrides a field from the command line. `validate(config)`
runs before anything is built and raises a ConfigError naming the field, the value and
what would be accepted.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from deltal_jax import advantages, aggregation, kl
from deltal_jax.models.config import PRESETS, REMAT_POLICIES
from deltal_jax.policy_loss import VARIANTS
from deltal_jax.warmup import SOLUTION_FORMATS, TINY_PRESET

TASKS = ("countdown", "math", "gsm8k")
TEMPLATES = ("compact", "base", "chat")
SCHEDULES = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    """A bad configuration value, reported at start-up."""


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (the CPU default run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # the RL run: sampling keys, data order (data.seed and warmup.seed: the rest)
    c.total_steps = 200

    # Policy: a local HF checkpoint directory (config.json, *.safetensors,
    # tokenizer.json) if given; else the preset "countdown-tiny" (a tiny character-level
    # model warmed up with supervised steps, see `warmup`), or any model preset with
    # random weights and the character-level tokenizer (for benchmarks and scale tests).
    c.model = ml_collections.ConfigDict()
    c.model.preset = "countdown-tiny"
    c.model.hf_dir = ""
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "projections"  # none | dots | projections | full (ModelConfig.remat)
    c.model.scan_layers = True  # False unrolls the layer loop (compile time grows with depth)

    # Supervised warm-up of a freshly initialised model on generated solutions, so RL
    # starts from a policy that writes well-formed answers of varied length. Its
    # checkpoint is written in HF layout to <workdir>/warmup and loaded from there.
    c.warmup = ml_collections.ConfigDict()
    c.warmup.seed = 0  # initialisation and example draw: runs differing in `seed` share it
    c.warmup.steps = 400
    c.warmup.batch_size = 64
    c.warmup.learning_rate = 3e-3
    c.warmup.num_examples = 20000  # worked solutions drawn from the train records
    c.warmup.solution_format = "steps"  # "steps": 9-3=6 6*4=24<answer>..; "answer": bare
    # A directory shared by runs (e.g. a sweep's trials): the warm-up is built once per
    # distinct warm-up setting in <cache_dir>/<key> and reused. Empty: <workdir>/warmup.
    c.warmup.cache_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.task = "countdown"
    c.data.template = "compact"
    c.data.data_dir = ""  # TFDS data dir; empty: generate Countdown records in memory
    c.data.jsonl_train = ""  # math: local JSONL files with {"question", "answer"}
    c.data.jsonl_test = ""
    c.data.num_numbers = (3,)
    c.data.max_number = 9
    c.data.max_target = 30
    c.data.test_fraction = 0.2  # share of the instance space held out for evaluation
    c.data.num_train = 1000
    c.data.seed = 0  # which Countdown instances are drawn (train: seed, held-out: seed + 1)
    c.data.num_eval = 200

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 16  # B
    c.rollout.group_size = 8  # G
    c.rollout.max_prompt_len = 16
    c.rollout.max_response_len = 32  # M: the aggregators' constant, never the padded width
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.cache_phases = 4  # decode phases over a growing KV cache (sampling.py)
    c.rollout.sync_every = 1  # 1: online; s > 1: semi-online; 0: offline (never refreshed)
    c.rollout.dynamic_sampling = False  # DAPO: keep only groups with reward spread
    c.rollout.max_sampling_rounds = 4

    c.reward = ml_collections.ConfigDict()
    c.reward.verifier = ""  # empty: the task's own verifier
    c.reward.format_score = 0.0
    c.reward.timeout_s = 5.0
    c.reward.num_workers = 2
    c.reward.overlong_buffer = 0  # DAPO soft overlong punishment buffer L_cache (0: off)
    c.reward.overlong_factor = 1.0
    c.reward.overlong_filter = False  # zero the advantage of truncated responses

    c.advantage = ml_collections.ConfigDict()
    c.advantage.estimator = "grpo"
    c.advantage.eps = 1e-6
    c.advantage.ddof = 1
    c.advantage.stratified_blend = 1.0

    c.loss = ml_collections.ConfigDict()
    c.loss.aggregation = "delta-l"
    c.loss.alpha = 1.0
    c.loss.scope = "batch"
    c.loss.variant = "ppo"
    c.loss.eps_low = 0.2
    c.loss.eps_high = 0.28
    c.loss.clip_ratio_c = 3.0  # dual clip; 0 disables it
    c.loss.entropy_coef = 0.0
    c.loss.entropy_aggregation = "token-mean"

    c.kl = ml_collections.ConfigDict()
    c.kl.beta = 0.0  # 0: no reference model is built
    c.kl.estimator = "k1"
    c.kl.placement = "reward"
    c.kl.off_policy_correction = False
    c.kl.aggregation = "token-mean"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.grad_clip = 1.0

    c.ppo = ml_collections.ConfigDict()
    c.ppo.epochs = 1
    c.ppo.minibatches = 1  # optimiser steps per epoch; each sees B·G/minibatches rows
    c.ppo.microbatch_size = 0  # rows per accumulation step; 0: the whole mini-batch
    c.ppo.max_nonfinite_updates = 5  # skipped updates tolerated before the run stops

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 10
    c.checkpoint.max_to_keep = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 20
    c.eval.num_samples = 4  # k of Avg@k / Pass@k
    c.eval.temperature = 1.0
    c.eval.seed = 1234

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.console = True
    c.logging.wandb_project = ""
    c.logging.plot = True
    return c


# The baselines of the ΔL paper, as config presets of the recipes in configs/.
PAPER_BASELINES = {
    "grpo": "seq-mean-token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


def paper_recipe() -> ml_collections.ConfigDict:
    """The ΔL paper's shared settings (ALGORITHMS.md §7, from the reference scripts):
    base model without chat template, 128 prompts × G = 10, PPO mini-batches of 32
    prompts, AdamW lr 1e-6 constant with weight decay 0.01 and clip 1.0, ε 0.2 / 0.3,
    no KL, no entropy bonus, M = 8192, validation Avg@8 / Pass@8 at temperature 1.0."""
    c = base_config()
    c.total_steps = 300
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.template = "base"
    c.rollout.prompts_per_step = 128
    c.rollout.group_size = 10
    c.rollout.max_prompt_len = 256
    c.rollout.max_response_len = 8192
    c.loss.aggregation = "delta-l"
    c.loss.eps_low, c.loss.eps_high = 0.2, 0.3
    c.advantage.estimator = "grpo"
    c.kl.beta = 0.0
    c.optim.learning_rate = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.ppo.minibatches = 4
    c.ppo.microbatch_size = 16
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.checkpoint.every = 20
    c.eval.every = 20
    c.eval.num_samples = 8
    c.reward.num_workers = 16
    return c


def apply_paper_preset(
    config: ml_collections.ConfigDict,
    arg: str | None,
    extra: dict[str, Callable[[ml_collections.ConfigDict], None]] | None = None,
) -> ml_collections.ConfigDict:
    """Applies a recipe preset: None, "" or "delta_l" keeps ΔL; a `PAPER_BASELINES` name
    swaps in that aggregator; a name in `extra` calls its function on the config."""
    extra = extra or {}
    if arg in PAPER_BASELINES:
        config.loss.aggregation = PAPER_BASELINES[arg]
    elif arg in extra:
        extra[arg](config)
    elif arg not in (None, "", "delta_l"):
        accepted = ", ".join(["delta_l", *PAPER_BASELINES, *extra])
        raise ValueError(f"Unknown preset {arg!r}; accepted: {accepted}.")
    return config


def _fail(field: str, value, accepted: str) -> None:
    raise ConfigError(f"config.{field}={value!r} is invalid; accepted: {accepted}.")


def _one_of(config, field: str, choices) -> None:
    value = _get(config, field)
    if value not in choices:
        _fail(field, value, ", ".join(map(str, choices)))


def _positive(config, field: str, allow_zero: bool = False) -> None:
    value = _get(config, field)
    ok = isinstance(value, int | float) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        _fail(field, value, "a number >= 0" if allow_zero else "a number > 0")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field that could otherwise fail late or silently; raises ConfigError."""
    known = base_config()
    for group in config:
        if group not in known:
            _fail(group, "…", f"top-level fields {', '.join(sorted(known.keys()))}")
        if isinstance(config[group], ml_collections.ConfigDict):
            for key in config[group]:
                if key not in known[group]:
                    _fail(f"{group}.{key}", config[group][key], f"fields of config.{group}: "
                          + ", ".join(sorted(known[group].keys())))  # fmt: skip

    presets = (TINY_PRESET, *sorted(PRESETS))
    if not config.model.hf_dir and config.model.preset not in presets:
        _fail("model.preset", config.model.preset, ", ".join(presets))
    _one_of(config, "model.dtype", ("float32", "bfloat16", "float16"))
    _one_of(config, "model.param_dtype", ("float32", "bfloat16"))
    _one_of(config, "model.remat", REMAT_POLICIES)
    _one_of(config, "data.task", TASKS)
    _one_of(config, "data.template", TEMPLATES)
    _one_of(config, "warmup.solution_format", SOLUTION_FORMATS)
    if config.data.template == "compact" and config.data.task != "countdown":
        _fail("data.template", "compact", "'compact' only for data.task='countdown'")
    if config.data.task == "math" and not config.data.jsonl_train:
        _fail("data.jsonl_train", "", "a path to a JSONL file of {question, answer} lines")
    for field in ("total_steps", "rollout.prompts_per_step", "rollout.group_size",
                  "rollout.max_prompt_len", "rollout.max_response_len", "rollout.temperature",
                  "rollout.cache_phases", "optim.learning_rate", "ppo.epochs", "ppo.minibatches",
                  "checkpoint.every", "eval.every", "eval.num_samples", "eval.temperature",
                  "reward.timeout_s", "reward.num_workers", "data.num_eval"):  # fmt: skip
        _positive(config, field)
    for field in ("warmup.steps", "kl.beta", "loss.entropy_coef", "optim.weight_decay",
                  "optim.grad_clip", "rollout.sync_every", "ppo.microbatch_size",
                  "reward.overlong_buffer", "ppo.max_nonfinite_updates"):  # fmt: skip
        _positive(config, field, allow_zero=True)
    if not 0 < config.rollout.top_p <= 1:
        _fail("rollout.top_p", config.rollout.top_p, "a number in (0, 1]")

    try:
        aggregation.validate(
            config.loss.aggregation,
            max_response_len=config.rollout.max_response_len,
            alpha=config.loss.alpha,
            scope=config.loss.scope,
            group_size=config.rollout.group_size,
        )
    except ValueError as e:
        raise ConfigError(f"config.loss: {e}") from None
    for field in ("loss.entropy_aggregation", "kl.aggregation"):
        try:
            aggregation.canonical_mode(_get(config, field))
        except ValueError as e:
            raise ConfigError(f"config.{field}: {e}") from None
    _one_of(config, "loss.variant", VARIANTS)
    _positive(config, "loss.eps_low", allow_zero=True)
    _positive(config, "loss.eps_high", allow_zero=True)
    if config.loss.clip_ratio_c and config.loss.clip_ratio_c <= 1:
        _fail("loss.clip_ratio_c", config.loss.clip_ratio_c, "a number > 1, or 0 to disable")
    _one_of(config, "advantage.estimator", advantages.ESTIMATORS)
    if config.advantage.estimator in ("stratified", "spo"):
        _fail(
            "advantage.estimator",
            config.advantage.estimator,
            "grpo, mean_only, rloo, reinforce_pp_baseline or bnpo in the trainer "
            "(stratified needs a structural key per response and spo one response per prompt)",
        )
    if config.advantage.estimator == "rloo" and config.rollout.group_size < 2:
        _fail("rollout.group_size", config.rollout.group_size, ">= 2 for the rloo estimator")
    try:
        kl.validate(config.kl.estimator, config.kl.placement, config.kl.off_policy_correction)
    except ValueError as e:
        raise ConfigError(f"config.kl: {e}") from None
    _one_of(config, "optim.schedule", SCHEDULES)

    rows = config.rollout.prompts_per_step * config.rollout.group_size
    if rows % config.ppo.minibatches:
        _fail("ppo.minibatches", config.ppo.minibatches,
              f"a divisor of prompts_per_step × group_size = {rows}")  # fmt: skip
    mini = rows // config.ppo.minibatches
    micro = config.ppo.microbatch_size or mini
    if mini % micro:
        _fail("ppo.microbatch_size", micro, f"a divisor of the mini-batch size {mini}, or 0")
    if config.reward.overlong_buffer > config.rollout.max_response_len:
        _fail("reward.overlong_buffer", config.reward.overlong_buffer,
              f"at most rollout.max_response_len={config.rollout.max_response_len}")  # fmt: skip
