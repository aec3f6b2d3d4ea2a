"""Prompt templates: base-model format, math and Countdown turns, chat hook."""

from deltal_jax.data.templates import (
    ASSISTANT_OPENING,
    base_prompt,
    chat_prompt,
    countdown_problem,
    math_problem,
)
from deltal_jax.rewards.countdown import extract_last_answer


def test_base_prompt_wraps_the_problem_and_opens_think():
    prompt = base_prompt("PROBLEM")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert "\nUser: PROBLEM\nAssistant: Let me solve this step by step.\n<think>" in prompt
    assert prompt.endswith("<think>")
    assert prompt.count("<think>") == 1


def test_countdown_problem_states_numbers_target_and_answer_tags():
    text = countdown_problem([3, 5, 7], 22)
    assert "[3, 5, 7]" in text and "equals 22" in text
    assert "exactly once" in text
    # The example in the instructions must not be a valid answer for this instance.
    assert extract_last_answer(text).strip() == "(1 + 2) / 3"


def test_math_problem_asks_for_boxed():
    text = math_problem("  What is 1+1?  ")
    assert text.startswith("What is 1+1?\n")
    assert "\\boxed{}" in text


def test_chat_prompt_passes_messages_and_appends_opening():
    seen = []

    def fake_template(messages):
        seen.append(messages)
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<bot>"

    assert chat_prompt("Q", fake_template) == "<user>Q</user><bot>" + ASSISTANT_OPENING
    assert chat_prompt("Q", fake_template, system="S", assistant_opening="") == (
        "<system>S</system><user>Q</user><bot>"
    )
    assert seen[0] == [{"role": "user", "content": "Q"}]
