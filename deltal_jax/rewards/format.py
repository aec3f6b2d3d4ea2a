"""Format reward: `<think>…</think>` followed by `<answer>…</answer>` and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deltal_jax.rewards.result import RewardResult

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(
    response: str,
    meta: Mapping[str, Any] | None = None,
    *,
    think_opened_in_prompt: bool = True,
) -> RewardResult:
    """1.0 when the response is `<think>…</think> <answer>…</answer>` with each tag exactly
    once, in that order, and only whitespace around them; else 0.0.

    The base-model prompt ends with `<think>` (see `deltal_jax.data.templates`), so by
    default the response is read as continuing it. `meta` is unused; it keeps the
    signature of every reward function. Uses counts and `find` only, linear in length.
    """
    del meta
    text = ("<think>" + response if think_opened_in_prompt else response).strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return RewardResult(0.0, "bad_tag_count")
    positions = [text.find(tag) for tag in _TAGS]
    if positions != sorted(positions) or positions[0] != 0:
        return RewardResult(0.0, "bad_tag_order")
    between = text[positions[1] + len("</think>") : positions[2]]
    if between.strip() or not text.endswith("</answer>"):
        return RewardResult(0.0, "text_outside_tags")
    return RewardResult(1.0, "well_formed")
