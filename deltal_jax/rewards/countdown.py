"""Countdown reward: a safe parser and exact evaluator for arithmetic answers.

The model must write an expression over the given numbers, each used exactly once, with
+ − × ÷ and parentheses, inside the last `<answer>…</answer>` block of its response
(ALGORITHMS.md section 8). The reference implementation runs Python `eval` behind a
character whitelist; here model text is only ever tokenised and parsed by the small
recursive-descent parser below, evaluated with exact rationals, and bounded in length,
nesting depth and literal size, so every call finishes in time linear in the response.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from deltal_jax.rewards.result import RewardResult

# Countdown answers for 3–6 small numbers are a few dozen characters; the caps are far
# above any honest answer and keep adversarial ones cheap.
MAX_EXPRESSION_CHARS = 512
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 12
TOLERANCE = Fraction(1, 100_000)

_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() also accepts '٣' and '３'.
_OPERATORS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "/": "/", "÷": "/"}
_WHITESPACE = frozenset(" \t\n\r")


class ExpressionError(ValueError):
    """The expression is not a valid Countdown expression; the message says why."""


def extract_last_answer(response: str) -> str | None:
    """Returns the text of the last complete `<answer>…</answer>` block, or None.

    Uses the last closing tag and the nearest opening tag before it, which is linear in
    the response length (a lazy regex over many unclosed tags is quadratic).
    """
    end = response.rfind("</answer>")
    if end < 0:
        return None
    start = response.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return response[start + len("<answer>") : end]


def tokenize(expression: str) -> list[str]:
    """Splits an expression into integer literals, canonical operators and parentheses.

    Unicode operators map to ASCII (`×`→`*`, `÷`→`/`, `−`→`-`). Raises ExpressionError
    on any other character, on literals longer than MAX_LITERAL_DIGITS and on
    expressions longer than MAX_EXPRESSION_CHARS.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[str] = []
    i = 0
    while i < len(expression):
        char = expression[i]
        if char in _DIGITS:
            j = i
            while j < len(expression) and expression[j] in _DIGITS:
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number literal longer than {MAX_LITERAL_DIGITS} digits")
            tokens.append(expression[i:j])
            i = j
            continue
        if char in _OPERATORS:
            tokens.append(_OPERATORS[char])
        elif char in "()":
            tokens.append(char)
        elif char not in _WHITESPACE:
            raise ExpressionError(f"unexpected character {char!r}; accepted: digits + - * / ( )")
        i += 1
    return tokens


class _Parser:
    """Recursive descent over `expr := term (('+'|'-') term)*`,
    `term := factor (('*'|'/') factor)*`, `factor := INT | '(' expr ')'`.

    There is no unary minus: Countdown combines the given non-negative numbers with
    binary operations only. Division is exact (Fraction); division by zero is invalid.
    """

    def __init__(self, tokens: Sequence[str]):
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ExpressionError("empty expression")
        value = self._expr(0)
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected token {self.tokens[self.pos]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._factor(depth)
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value /= rhs
        return value

    def _factor(self, depth: int) -> Fraction:
        token = self._peek()
        if token is None:
            raise ExpressionError("expression ends early")
        self.pos += 1
        if token == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise ExpressionError("unbalanced parentheses")
            self.pos += 1
            return value
        if token[0] in _DIGITS:
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"unexpected token {token!r}")


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Returns the exact value of a Countdown expression and the literals it uses, in order.

    Raises ExpressionError for anything that is not a bounded, well-formed expression.
    """
    parser = _Parser(tokenize(expression))
    value = parser.parse()
    return value, parser.numbers


def countdown_reward(
    response: str,
    meta: Mapping[str, Any],
    *,
    format_score: float = 0.0,
) -> RewardResult:
    """Scores a response to a Countdown instance `meta = {"numbers": [...], "target": t}`.

    1.0 when the last answer evaluates to within 1e-5 of the target using exactly the
    given multiset of numbers; `format_score` when the answer parses but is wrong or uses
    the wrong numbers; 0.0 otherwise. Never raises on model output.
    """
    answer = extract_last_answer(response)
    if answer is None:
        return RewardResult(0.0, "no_answer")
    try:
        value, used = evaluate_expression(answer)
    except ExpressionError as e:
        return RewardResult(0.0, f"invalid_expression: {e}")
    if Counter(used) != Counter(int(n) for n in meta["numbers"]):
        return RewardResult(format_score, "numbers_mismatch")
    if abs(value - Fraction(meta["target"])) >= TOLERANCE:
        return RewardResult(format_score, "wrong_value")
    return RewardResult(1.0, "correct")
