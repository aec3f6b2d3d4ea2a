"""The small model of the default CPU run: a character-level tokenizer, a tiny Qwen2-style
decoder, and a short supervised warm-up on generated Countdown solutions.

RL from random weights would never see a reward on Countdown, so the default run first
teaches a fresh model the answer format with a few hundred supervised steps on worked
solutions: the arithmetic steps, then the expression they build,
`9-3=6 6*4=24<answer>(9-3)*4</answer>`. A random valid solution is drawn for each
example. The steps are small facts shared across instances, so what the warm-up teaches
carries over to held-out instances (a bare expression mostly gets memorised per
instance), and they leave RL something general to improve: the arithmetic, and the
choice of first step. Lengths vary with the digits and the number of steps.
The result is written as an ordinary HF-layout checkpoint (config.json,
model.safetensors, tokenizer.json) and the RL loop loads it with the same code that
loads a real Qwen checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deltal_jax.data.countdown import Trace, solution_traces
from deltal_jax.models import (
    ModelConfig,
    Tokenizer,
    get_preset,
    init_model,
    load_tokenizer,
    response_logprobs,
    save_model,
)

PAD, EOS = "<pad>", "<eos>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CHARACTERS = "0123456789+-*/()=: "
TINY_PRESET = "countdown-tiny"


def write_char_tokenizer(directory: str) -> Tokenizer:
    """Writes a character-level `tokenizer.json` (+ its config files) and loads it back.

    Ids: <pad> 0, <eos> 1, <answer> 2, </answer> 3, then one id per character. The answer
    tags are single tokens so a tiny model spends its capacity on the arithmetic.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, ANSWER_OPEN, ANSWER_CLOSE])}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    backend = Backend(models.WordLevel(vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([PAD, EOS])
    backend.add_tokens([ANSWER_OPEN, ANSWER_CLOSE])
    os.makedirs(directory, exist_ok=True)
    backend.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": EOS, "pad_token": PAD}, f)
    return load_tokenizer(directory)


def tiny_model_config(vocab_size: int, **overrides: Any) -> ModelConfig:
    """A ~0.4M-parameter Qwen2-style decoder that trains in minutes on two CPU cores."""
    return get_preset(
        "tiny",
        vocab_size=vocab_size,
        hidden_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        max_position_embeddings=128,
        eos_token_id=(1,),
        **overrides,
    )


SOLUTION_FORMATS = ("steps", "answer")


def answer_text(solution: str) -> str:
    """The bare answer `<answer>expr</answer>`, no spaces."""
    return ANSWER_OPEN + solution.replace(" ", "") + ANSWER_CLOSE


def solution_text(trace: Trace, solution_format: str = "steps") -> str:
    """The response a warmed-up policy writes: `9-3=6 6*4=24<answer>(9-3)*4</answer>`
    ("steps"), or the answer alone ("answer")."""
    if solution_format not in SOLUTION_FORMATS:
        raise ValueError(
            f"unknown solution_format {solution_format!r}; accepted: {SOLUTION_FORMATS}"
        )
    steps = " ".join(trace.steps) if solution_format == "steps" else ""
    return steps + answer_text(trace.expression)


def sample_solutions(
    records: Sequence[dict[str, Any]],
    num_examples: int,
    *,
    seed: int,
    solution_format: str = "steps",
) -> tuple[list[dict[str, Any]], list[str]]:
    """`num_examples` (record, response) pairs: a random record, then a random one of its
    step-by-step solutions (`solution_traces`). Records without one (e.g. only reachable
    through a fraction) are skipped."""
    traces = [solution_traces(r["numbers"], r["target"]) for r in records]
    usable = [i for i, t in enumerate(traces) if t]
    if not usable:
        raise ValueError("none of the records has a solution with integer intermediates")
    rng = np.random.default_rng(seed)
    picked, responses = [], []
    for i in rng.choice(usable, num_examples):
        picked.append(records[i])
        responses.append(solution_text(traces[i][rng.integers(len(traces[i]))], solution_format))
    return picked, responses


def supervised_batch(
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer: Tokenizer,
    max_prompt_len: int,
    max_response_len: int,
) -> dict[str, np.ndarray]:
    """Left-padded prompts [N, P] and right-padded responses + EOS [N, M] with masks."""
    prompt_ids, prompt_mask = tokenizer.pad_prompts(
        [tokenizer.encode(p) for p in prompts], max_prompt_len
    )
    n = len(responses)
    resp = np.full((n, max_response_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, max_response_len), bool)
    for i, text in enumerate(responses):
        ids = [*tokenizer.encode(text), tokenizer.eos_ids[0]][:max_response_len]
        resp[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "resp_ids": resp,
        "resp_mask": mask,
    }


def _sft_loss(model, batch):
    """Token-mean negative log-likelihood of the reference responses."""
    lp = response_logprobs(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["resp_ids"], batch["resp_mask"]
    ).logp
    mask = batch["resp_mask"].astype(jnp.float32)
    return -jnp.sum(lp * mask) / jnp.sum(mask)


@nnx.jit
def _sft_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(_sft_loss)(model, batch)
    optimizer.update(model, grads)
    return loss


def warm_up(
    examples: dict[str, np.ndarray],
    model_cfg: ModelConfig,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log_every: int = 100,
) -> tuple[nnx.Module, list[float]]:
    """Supervised steps on `examples` (from `supervised_batch`); returns the model and losses."""
    model = init_model(model_cfg, seed=seed)
    schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    n = len(examples["resp_ids"])
    losses = []
    for step in range(steps):
        idx = rng.integers(0, n, batch_size)
        batch = {k: jnp.asarray(v[idx]) for k, v in examples.items()}
        losses.append(float(_sft_step(model, optimizer, batch)))
        if log_every and (step + 1) % log_every == 0:
            print(f"warm-up step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
    return model, losses


def build_random_model(directory: str, model_cfg: ModelConfig, *, seed: int) -> str:
    """A preset with random weights and the character-level tokenizer, in HF layout."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = write_char_tokenizer(tmp)
    cfg = model_cfg.replace(
        vocab_size=max(model_cfg.vocab_size, tokenizer.vocab_size), eos_token_id=tokenizer.eos_ids
    )
    save_model(init_model(cfg, seed=seed), tmp)
    os.replace(tmp, directory)
    return directory


EvaluateFn = Callable[[nnx.Module, Tokenizer], dict[str, float]]
REPORT = "warmup_report.json"


def build_warm_model(
    directory: str,
    records: Sequence[dict[str, Any]],
    prompt_fn,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    max_prompt_len: int,
    max_response_len: int | None = None,
    num_examples: int = 20000,
    solution_format: str = "steps",
    evaluate: EvaluateFn | None = None,
) -> str:
    """Tokenizer + tiny model + warm-up, saved in HF layout to `directory`; returns it.

    The warm-up trains on `num_examples` worked solutions drawn from `records` (see
    `sample_solutions`), padded to `max_response_len` tokens (None: the longest one plus
    EOS, so no solution is cut; the warm-up then does not depend on the RL run's M).

    With `evaluate`, the model is evaluated before and after the warm-up and the figures
    are written to `directory/warmup_report.json`, so a run's log shows what the warm-up
    and what RL contributed. An existing complete checkpoint in `directory` is reused, so
    a resumed run does not repeat (or change) its warm-up.
    """
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    # Private to this process: runs sharing a cache directory may build concurrently.
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed warm-up
    tokenizer = write_char_tokenizer(tmp)
    picked, responses = sample_solutions(
        records, num_examples, seed=seed, solution_format=solution_format
    )
    if max_response_len is None:
        max_response_len = 1 + max(len(tokenizer.encode(text)) for text in set(responses))
    examples = supervised_batch(
        [prompt_fn(r) for r in picked], responses, tokenizer, max_prompt_len, max_response_len
    )
    model_cfg = tiny_model_config(tokenizer.vocab_size)
    report = {}
    if evaluate is not None:
        before = evaluate(init_model(model_cfg, seed=seed), tokenizer)
        report.update({f"before/{k}": v for k, v in before.items()})
    model, losses = warm_up(
        examples,
        model_cfg,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )
    if evaluate is not None:
        report.update({f"after/{k}": v for k, v in evaluate(model, tokenizer).items()})
    report["final_loss"] = float(np.mean(losses[-20:])) if losses else float("nan")
    save_model(model, tmp)
    with open(os.path.join(tmp, REPORT), "w") as f:
        json.dump(report, f, indent=1)
    try:
        os.replace(tmp, directory)  # atomic: the directory exists only once it is complete
    except OSError:  # another run finished the same warm-up first: use that one
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise
        shutil.rmtree(tmp)
    return directory


def cache_directory(cache_dir: str, settings: dict[str, Any]) -> str:
    """`<cache_dir>/warmup-<hash of settings>`: one warm-up per distinct setting, shared
    by every run that asks for it (a sweep's trials start from the same policy)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return os.path.join(
        cache_dir, f"warmup-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"
    )
