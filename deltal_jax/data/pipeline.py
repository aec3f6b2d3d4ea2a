"""grain pipelines from a record source to fixed-shape batches of tokenised prompts.

source → attach example id → shard by host → shuffle (seeded, reshuffled each epoch) →
repeat → render the prompt → tokenise, left-pad / truncate to `max_prompt_len` → batch.

Every step is an index transformation of a `grain.MapDataset`, so the iterator's whole
state is the index of the next batch: `iterator.get_state()` after k batches, restored
with `set_state` into an iterator of the same pipeline, continues with exactly the
batches the first one would have produced. That is what makes kill-and-resume exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from deltal_jax.data.builders import extract_gsm8k_answer
from deltal_jax.data.templates import (
    ChatTemplateFn,
    base_prompt,
    chat_prompt,
    compact_countdown_prompt,
    countdown_problem,
    math_problem,
)

TRUNCATIONS = ("left", "error")
TEMPLATES = ("base", "chat", "compact")


class PromptTask(NamedTuple):
    """How a record becomes a problem text and the metadata its verifier needs."""

    problem: Callable[[Mapping[str, Any]], str]
    reward_meta: Callable[[Mapping[str, Any]], dict[str, Any]]
    verifier: str  # name in deltal_jax.rewards.REWARD_FNS


TASKS: dict[str, PromptTask] = {
    "countdown": PromptTask(
        problem=lambda r: countdown_problem(r["numbers"], r["target"]),
        reward_meta=lambda r: {
            "numbers": [int(n) for n in r["numbers"]],
            "target": int(r["target"]),
        },
        verifier="countdown",
    ),
    "math": PromptTask(
        problem=lambda r: math_problem(r["question"]),
        reward_meta=lambda r: {"answer": r["answer"]},
        verifier="math",
    ),
    "gsm8k": PromptTask(
        problem=lambda r: math_problem(r["question"]),
        reward_meta=lambda r: {"answer": extract_gsm8k_answer(r["answer"])},
        verifier="math",
    ),
}


def get_task(name: str) -> PromptTask:
    """Returns the task registered under `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: {sorted(TASKS)}")
    return TASKS[name]


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """TFDS records hold `bytes` for text and numpy scalars; turns them into Python values."""
    decoded = {}
    for key, value in record.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        decoded[key] = value
    return decoded


def pad_prompt(
    ids: Sequence[int], max_prompt_len: int, pad_id: int, truncation: str = "left"
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads `ids` to `max_prompt_len`: returns `ids [P] int32` and `mask [P] bool`.

    Prompts are left-padded so every prompt ends at the same column and generation
    starts there for the whole batch. A longer prompt keeps its last `max_prompt_len`
    tokens with `truncation="left"` (the instructions' end and the assistant opening
    matter most) or raises with `truncation="error"`.
    """
    if len(ids) > max_prompt_len:
        if truncation == "error":
            raise ValueError(f"prompt has {len(ids)} tokens > max_prompt_len={max_prompt_len}")
        ids = ids[len(ids) - max_prompt_len :]
    padding = max_prompt_len - len(ids)
    prompt_ids = np.full(max_prompt_len, pad_id, dtype=np.int32)
    prompt_ids[padding:] = ids
    mask = np.zeros(max_prompt_len, dtype=bool)
    mask[padding:] = True
    return prompt_ids, mask


def render_prompt(
    task: PromptTask,
    record: Mapping[str, Any],
    template: str = "base",
    apply_chat_template: ChatTemplateFn | None = None,
) -> str:
    """The prompt text of a decoded record in the base or chat template."""
    if template == "compact":
        if "numbers" not in record:
            raise ValueError("template='compact' is only defined for Countdown records")
        return compact_countdown_prompt(record["numbers"], record["target"])
    problem = task.problem(record)
    if template == "chat":
        return chat_prompt(problem, apply_chat_template)
    return base_prompt(problem)


def prompt_dataset(
    source: Sequence[Mapping[str, Any]],
    task: str,
    *,
    encode: Callable[[str], Sequence[int]],
    pad_id: int,
    max_prompt_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    template: str = "base",
    apply_chat_template: ChatTemplateFn | None = None,
    truncation: str = "left",
    num_threads: int = 2,
) -> grain.IterDataset:
    """Batches of tokenised prompts for one host.

    `source` is any random-access record source: `builder.as_data_source(split)` or a
    list of records (`deltal_jax.data.countdown.generate_split`). Each batch is a dict:

      prompt_ids   [B, P] int32, left-padded with `pad_id`
      prompt_mask  [B, P] bool, True on prompt tokens
      example_id   [B] int64, the record's `id` field, else its index in `source`
      prompt       [B] str, the rendered prompt text
      reward_meta  [B] str, JSON of the verifier's metadata (see `reward_metas`)

    Host `shard_index` of `shard_count` (e.g. `jax.process_index()` and
    `jax.process_count()`) reads records `shard_index::shard_count`, so hosts partition
    the data. The trainer does not shard: each of its processes reads the whole global
    batch, so a run's data order does not depend on the number of hosts (train.py).
    The last incomplete batch of a finite run is dropped to keep shapes static.
    `iter(dataset)` gives an iterator with `get_state()` / `set_state(state)`.
    """
    prompt_task = get_task(task)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; accepted: {TEMPLATES}")
    if template == "chat" and apply_chat_template is None:
        raise ValueError("template='chat' needs apply_chat_template")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; accepted: {TRUNCATIONS}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    num_records = len(source)
    if num_records < shard_count:
        raise ValueError(f"{num_records} records cannot be shared by {shard_count} hosts")

    def with_id(index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        # After shuffle and repeat, grain passes the unwrapped index; the modulo folds it.
        decoded = decode_record(record)
        decoded.setdefault("id", index % num_records)
        return decoded

    def to_features(record: dict[str, Any]) -> dict[str, Any]:
        prompt = render_prompt(prompt_task, record, template, apply_chat_template)
        prompt_ids, prompt_mask = pad_prompt(encode(prompt), max_prompt_len, pad_id, truncation)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "example_id": np.int64(record["id"]),
            "prompt": prompt,
            "reward_meta": json.dumps(prompt_task.reward_meta(record)),
        }

    dataset = (
        grain.MapDataset.source(source)
        .map_with_index(with_id)[shard_index::shard_count]
        .shuffle(seed=seed)
        .repeat(num_epochs)
        .map(to_features)
        .batch(batch_size, drop_remainder=True)
    )
    # Elements here are whole batches: a couple per thread is enough look-ahead.
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return dataset.to_iter_dataset(read_options)


def reward_metas(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-example verifier metadata of a batch, as `score_batch` takes it."""
    return [json.loads(meta) for meta in batch["reward_meta"]]
