"""Math verifier: extraction, normalisation, equivalence table, adversarial inputs.

Out of scope and so not tested as equivalent: intervals, tuples, sets, units, text.
"""

import time

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from deltal_jax.rewards.math import (
    LatexError,
    answers_equivalent,
    extract_last_boxed,
    math_reward,
    normalize_answer,
    parse_answer,
)


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{1} then \fbox{3}", "3"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed 5$", "5"),
        (r"\boxed{\frac{1}{2}", None),
        ("no box", None),
        (r"\boxed", None),
    ],
)
def test_extract_last_boxed(text, boxed):
    assert extract_last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\left( x \right)", "(x)"),
        (r"$ 5 $.", "5"),
        (r"10\text{ cm}", "10cm"),
        (r"x = 3", "3"),
        (r"90^\circ", "90"),
        (r"50\%", "50"),
        ("1,000,000", "1000000"),
        ("(1,000)", "(1,000)"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("1/2", r"\frac12"),
        (r"\sqrt{4}", "2"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"\sqrt[3]{27}", "3"),
        (r"\frac{\pi}{2}", r"\pi/2"),
        (r"2 \cdot 3", r"3 \times 2"),
        (r"12 \div 4", "3"),
        ("x^2+2x+1", "(x+1)^2"),
        ("2^{10}", "1024"),
        ("-(-3)", "3"),
        (".5", "0.50"),
    ],
)
def test_equivalent_forms(predicted, reference):
    assert answers_equivalent(normalize_answer(predicted), normalize_answer(reference))
    assert math_reward(rf"\boxed{{{predicted}}}", {"answer": reference}).score == 1.0


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("3", "4"),
        ("0.333", r"\frac{1}{3}"),
        ("2^{100}+1", "2^{100}"),
        ("ab", "ba"),  # words are not compared symbolically
        ("x+1", "x"),
        ("1/0", "1/0"),  # exact string match only; parsed, zoo is never equivalent
    ],
)
def test_different_answers(predicted, reference):
    assert not answers_equivalent(predicted, reference)


def test_exact_match_and_reasons():
    assert math_reward(r"\boxed{(1,2)}", {"answer": "(1, 2)"}) == (1.0, "correct: exact")
    assert math_reward(r"\boxed{(1,2)}", {"answer": "(2, 1)"}).reason.startswith("unparsed")
    assert math_reward("42", {"answer": "42"}) == (0.0, "no_boxed")
    assert math_reward(r"\boxed{41}", {"answer": "42"}) == (0.0, "wrong")
    # References from MATH solutions carry their own \boxed{}.
    assert math_reward(r"\boxed{0.5}", {"answer": r"so \boxed{\dfrac12}"}).score == 1.0


def test_parser_builds_expected_sympy_objects():
    x = sympy.Symbol("x")
    assert parse_answer(r"\frac{x}{2}+\sqrt{x}") == x / 2 + sympy.sqrt(x)
    assert parse_answer("2x^3") == 2 * x**3
    assert parse_answer(r"-2^2") == -4


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("10^{10^{10}}", "exponent larger"),
        ("9^9^9", "exponent larger"),
        ("(2^{999})^{999}", "bits"),
        ("{" * 100_000 + "1" + "}" * 100_000, "longer than"),
        ("{" * 60 + "1" + "}" * 60, "nested deeper"),
        ("1^" * 400 + "1", "nested deeper"),
        ("٣", "unsupported token"),
        ("３", "unsupported token"),
        (r"\input{/etc/passwd}", "unsupported token"),
        ("__import__('os')", "unsupported token"),
        ("1" * 60, "number longer"),
    ],
)
def test_adversarial_answers_are_rejected_fast(answer, message):
    start = time.perf_counter()
    with pytest.raises(LatexError, match=message):
        parse_answer(answer)
    assert time.perf_counter() - start < 0.5
    assert math_reward(rf"\boxed{{{answer}}}", {"answer": "1"}).score == 0.0


def test_megabyte_response_is_fast():
    start = time.perf_counter()
    result = math_reward(r"\boxed{" * 300_000 + "1", {"answer": "1"})
    assert time.perf_counter() - start < 1.0
    assert result == (0.0, "no_boxed")


_LATEX_PIECES = st.sampled_from(
    ["1", "2", "x", "+", "-", "^", "{", "}", "(", ")", r"\frac", r"\sqrt", r"\pi", "/", ".", "9"]
)


@settings(max_examples=150, deadline=2000)
@given(st.lists(_LATEX_PIECES, max_size=30).map("".join) | st.text(max_size=300))
def test_random_answers_never_raise(answer):
    result = math_reward(rf"\boxed{{{answer}}}", {"answer": r"\frac{1}{2}"})
    assert result.score in (0.0, 1.0)
