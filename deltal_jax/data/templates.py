"""Prompt templates: base-model conversation format (ΔL paper, TinyZero) and chat format.

The base format writes the conversation as plain text and ends the prompt inside an
opened `<think>` block, so a base model continues with its reasoning, closes it and
answers in `<answer>` tags (Countdown) or `\\boxed{}` (math). The chat format hands the
user turn to a tokenizer's chat template and appends the same assistant opening.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ASSISTANT_OPENING = "Let me solve this step by step.\n<think>"

BASE_TEMPLATE = (
    "A conversation between User and Assistant. The User poses a problem and the "
    "Assistant solves it. The Assistant first works through the reasoning in its mind "
    "and then gives the User the answer.\n"
    "User: {problem}\n"
    "Assistant: " + ASSISTANT_OPENING
)

ChatTemplateFn = Callable[[list[dict[str, str]]], str]


def countdown_problem(numbers: Sequence[int], target: int) -> str:
    """The user turn of a Countdown instance: rules and the answer format."""
    listed = ", ".join(str(int(n)) for n in numbers)
    return (
        f"Using the numbers [{listed}], write an equation that equals {int(target)}. "
        "You may use +, -, * and / and parentheses, and each number must be used exactly "
        "once. Show your reasoning in <think> </think> tags and write the final equation "
        "in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )


def compact_countdown_prompt(numbers: Sequence[int], target: int) -> str:
    """A terse Countdown prompt for the tiny character-level model of the CPU run:
    `3 7 12=22:`, answered with `<answer>(7+12)-3</answer>`."""
    return " ".join(str(int(n)) for n in numbers) + f"={int(target)}:"


def math_problem(question: str) -> str:
    """The user turn of a math question, asking for a `\\boxed{}` final answer."""
    return (
        f"{question.strip()}\n"
        "Show your reasoning in <think> </think> tags, then give the final answer "
        "within \\boxed{}."
    )


def base_prompt(problem: str) -> str:
    """The full base-model prompt for a user turn."""
    return BASE_TEMPLATE.format(problem=problem)


def chat_prompt(
    problem: str,
    apply_chat_template: ChatTemplateFn,
    *,
    system: str | None = None,
    assistant_opening: str = ASSISTANT_OPENING,
) -> str:
    """The prompt for a chat model: `apply_chat_template(messages)` must return the
    rendered conversation ending with the assistant header (the generation prompt), as
    `tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)` does.
    """
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": problem})
    return apply_chat_template(messages) + assistant_opening
