"""Countdown verifier: correctness table, exact evaluation, adversarial inputs."""

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltal_jax.rewards.countdown import (
    MAX_DEPTH,
    ExpressionError,
    countdown_reward,
    evaluate_expression,
    extract_last_answer,
)

META = {"numbers": [3, 5, 7], "target": 22}


@pytest.mark.parametrize(
    ("response", "score", "reason"),
    [
        ("<answer>3 * 5 + 7</answer>", 1.0, "correct"),
        ("<answer>  7 + 5 *   3 \n</answer>", 1.0, "correct"),
        ("<answer>(7 - 3) * 5 + 2</answer>", 0.0, "numbers_mismatch"),  # 2 not given
        ("<answer>3 * 5 + 7 + 7</answer>", 0.0, "numbers_mismatch"),  # 7 reused
        ("<answer>3 * 5</answer>", 0.0, "numbers_mismatch"),  # 7 missing
        ("<answer>3 + 5 + 7</answer>", 0.0, "wrong_value"),
        ("<answer>3 × 5 + 7</answer>", 1.0, "correct"),
        ("<answer>7 − 3 × 5</answer>", 0.0, "wrong_value"),  # = -8
        ("<answer>1+1</answer> then <answer>3*5+7</answer>", 1.0, "correct"),
        ("<answer>3*5+7</answer> then <answer>1+1</answer>", 0.0, "numbers_mismatch"),
        ("3 * 5 + 7", 0.0, "no_answer"),
        ("<answer>3 * 5 + 7", 0.0, "no_answer"),
        ("<answer>3 * 5 + 7 =</answer>", 0.0, "invalid_expression"),
        ("<answer>-3 + 5 * 7</answer>", 0.0, "invalid_expression"),  # no unary minus
        ("<answer>3 ** 5 + 7</answer>", 0.0, "invalid_expression"),
        ("<answer>3.0 * 5 + 7</answer>", 0.0, "invalid_expression"),
        ("<answer>__import__('os')</answer>", 0.0, "invalid_expression"),
    ],
)
def test_reward_table(response, score, reason):
    result = countdown_reward(response, META)
    assert result.score == score
    assert result.reason.split(":")[0] == reason


def test_division_is_exact_rational():
    # 6 / (1 - 3/4) = 24 needs the intermediate fraction 1/4.
    meta = {"numbers": [1, 3, 4, 6], "target": 24}
    assert countdown_reward("<answer>6 / (1 - 3 / 4)</answer>", meta).score == 1.0
    assert evaluate_expression("6 / (1 - 3 / 4)")[0] == Fraction(24)
    assert evaluate_expression("1 ÷ 3")[0] == Fraction(1, 3)


def test_division_by_zero_is_invalid():
    result = countdown_reward("<answer>3 / (5 - 5)</answer>", {"numbers": [3, 5, 5], "target": 1})
    assert result == (0.0, "invalid_expression: division by zero")


def test_format_score_only_for_parseable_wrong_answers():
    assert countdown_reward("<answer>3+5+7</answer>", META, format_score=0.1).score == 0.1
    assert countdown_reward("<answer>3+5</answer>", META, format_score=0.1).score == 0.1
    assert countdown_reward("<answer>3+</answer>", META, format_score=0.1).score == 0.0
    assert countdown_reward("<answer>3*5+7</answer>", META, format_score=0.1).score == 1.0


def test_extract_last_answer():
    assert extract_last_answer("<answer>a</answer><answer>b</answer>") == "b"
    assert extract_last_answer("<answer>a</answer><answer>b") == "a"
    assert extract_last_answer("</answer><answer>") is None


def test_depth_limit():
    nested = "(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH
    assert evaluate_expression(nested)[0] == 1
    with pytest.raises(ExpressionError, match="nested deeper"):
        evaluate_expression("(" + nested + ")")


@pytest.mark.parametrize(
    "answer",
    [
        "9**9**9",
        "(" * 100_000 + "1" + ")" * 100_000,
        "٣ + ５",
        "1" * 10_000,
        "99999999999999999 * 2",
        "1+" * 1_000_000 + "1",
    ],
)
def test_adversarial_answers_are_rejected_fast(answer):
    start = time.perf_counter()
    result = countdown_reward(f"<answer>{answer}</answer>", META)
    assert time.perf_counter() - start < 0.5
    assert result.score == 0.0
    assert result.reason.startswith("invalid_expression")


def test_megabyte_response_with_many_unclosed_tags_is_linear():
    start = time.perf_counter()
    result = countdown_reward("<answer>" * 500_000 + "</answer>" * 2, META)
    assert time.perf_counter() - start < 0.5
    assert result.reason.startswith("invalid_expression: unexpected character '<'")


@st.composite
def expression_trees(draw, depth=0):
    """A random expression string over small integers and its value computed on the tree."""
    if depth >= 3 or draw(st.booleans()):
        n = draw(st.integers(0, 50))
        return str(n), Fraction(n), [n]
    lhs, lhs_value, lhs_numbers = draw(expression_trees(depth=depth + 1))
    rhs, rhs_value, rhs_numbers = draw(expression_trees(depth=depth + 1))
    op = draw(st.sampled_from(["+", "-", "*", "/", "×", "÷", "−"]))
    canonical = {"×": "*", "÷": "/", "−": "-"}.get(op, op)
    if canonical == "/" and rhs_value == 0:
        canonical, op = "+", "+"
    value = {
        "+": lambda: lhs_value + rhs_value,
        "-": lambda: lhs_value - rhs_value,
        "*": lambda: lhs_value * rhs_value,
        "/": lambda: lhs_value / rhs_value,
    }[canonical]()
    return f"({lhs} {op} {rhs})", value, lhs_numbers + rhs_numbers


@settings(max_examples=200, deadline=None)
@given(expression_trees())
def test_evaluation_matches_tree_value(tree):
    text, value, numbers = tree
    assert evaluate_expression(text) == (value, numbers)


@settings(max_examples=200, deadline=1000)
@given(st.text(max_size=2000) | st.binary(max_size=2000).map(lambda b: b.decode("latin-1")))
def test_random_text_never_raises(text):
    for response in (text, f"<answer>{text}</answer>"):
        result = countdown_reward(response, META, format_score=0.1)
        assert result.score in (0.0, 0.1, 1.0)
