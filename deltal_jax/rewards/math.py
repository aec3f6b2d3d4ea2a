"""Math reward: last `\\boxed{…}` answer, normalised, compared exactly then symbolically.

Safety argument. Model text never reaches `eval`, `exec`, `sympify` or `parse_latex`.
The boxed answer is normalised with regular expressions that cannot backtrack
catastrophically, then tokenised against a whitelist (ASCII digits, single ASCII
letters, `+ - * / ^ ( ) { } [ ]` and the commands `\\frac \\sqrt \\pi \\cdot \\times
\\div`) and parsed by the recursive-descent parser below, which builds sympy objects
directly (`Integer`, `Rational`, `Symbol`, `Add`, `Mul`, `Pow`). Every input that is not
in that language raises `LatexError` and falls back to the exact string comparison.
Sizes are bounded: the answer length, nesting depth and literal digits are capped, and a
power with a numeric exponent is refused unless its exponent and the bit size of its
result are small, so `10^{10^{10}}` is rejected before sympy computes anything.
Symbolic simplification can still be slow on small inputs; that is what the hard
per-call time limit of `deltal_jax.rewards.scoring` is for. Called directly, this
module has no time limit.

Out of scope (exact string match only after normalisation): intervals, tuples, sets,
equations with more than a leading `x =`, text answers, units, matrices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import sympy

from deltal_jax.rewards.result import RewardResult

MAX_ANSWER_CHARS = 1000
MAX_DEPTH = 50
MAX_LITERAL_DIGITS = 50
MAX_EXPONENT = 1000
MAX_RESULT_BITS = 20_000
# For irrational numeric differences only (`\sqrt{2}/2` vs `\frac{1}{\sqrt{2}}`);
# rational answers are parsed exactly and compared exactly.
RELATIVE_TOLERANCE = 1e-9

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_COMMANDS = frozenset({"\\frac", "\\sqrt", "\\pi", "\\cdot", "\\times", "\\div"})
_SINGLE_CHARS = frozenset("+-*/^(){}[]")
_MULTIPLY = frozenset({"*", "\\cdot", "\\times"})
_DIVIDE = frozenset({"/", "\\div"})
_CLOSING = {"(": ")", "{": "}", "[": "]"}
_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|\\.|[a-zA-Z]|.", re.DOTALL | re.ASCII)

_NORMALISATION = (
    (re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\^\{?\\circ\}?|\\degree|\\%|%|\$|\\[!,;: ]"), ""),
    (re.compile(r"\s+"), ""),
    (re.compile(r"^[a-zA-Z]=(?!=)"), ""),
    (re.compile(r"\.+$"), ""),
)
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")


class LatexError(ValueError):
    """The answer is outside the supported LaTeX subset or its size limits."""


def extract_last_boxed(text: str) -> str | None:
    """Returns the content of the last `\\boxed{…}` or `\\fbox{…}`, or None.

    Braces are matched with escapes (`\\{`) skipped; `\\boxed 5` (no braces) gives the
    token after the space. Unbalanced or over-long content gives None.
    """
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(command)
    if text.startswith(" ", i):
        match = re.match(r" +([^\s$]+)", text[i : i + MAX_ANSWER_CHARS + 1])
        return match.group(1) if match else None
    if not text.startswith("{", i):
        return None
    depth = 0
    j, end = i, min(len(text), i + MAX_ANSWER_CHARS + 2)
    while j < end:
        char = text[j]
        if char == "\\":
            j += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer for exact comparison.

    Unwraps `\\text{}`-like commands, maps `\\dfrac`/`\\tfrac` to `\\frac`, drops
    `\\left`/`\\right`, `$`, degree and percent signs, LaTeX spacing, all whitespace, a
    leading single-letter assignment (`x=`) and trailing periods, and removes thousands
    separators from plain numbers (`1,000` → `1000`).
    """
    answer = answer[: MAX_ANSWER_CHARS + 1].strip()
    for pattern, replacement in _NORMALISATION:
        answer = pattern.sub(replacement, answer)
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


def _tokenize(answer: str) -> list[str]:
    if len(answer) > MAX_ANSWER_CHARS:
        raise LatexError(f"answer longer than {MAX_ANSWER_CHARS} characters")
    tokens = _TOKEN.findall(answer)
    for token in tokens:
        if _is_number(token):
            if len(token) > MAX_LITERAL_DIGITS:
                raise LatexError(f"number longer than {MAX_LITERAL_DIGITS} characters")
        elif not (token in _COMMANDS or token in _SINGLE_CHARS or _is_letter(token)):
            raise LatexError(f"unsupported token {token!r}")
    return tokens


def _is_number(token: str) -> bool:
    # ASCII only: str.isdigit() also accepts '٣' and '３'.
    return token[0] in "0123456789."


def _is_letter(token: str) -> bool:
    return len(token) == 1 and token.isascii() and token.isalpha()


def _checked_power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    """`base ** exponent`, refusing numeric powers whose evaluation would be expensive."""
    if exponent.is_Number:
        if abs(exponent) > MAX_EXPONENT:
            raise LatexError(f"exponent larger than {MAX_EXPONENT}")
        # sympy distributes powers over products, so `(c·x)^n` computes c^n eagerly.
        coefficient, _ = base.as_coeff_Mul()
        if coefficient.is_Rational:
            bits = max(int(coefficient.p).bit_length(), int(coefficient.q).bit_length())
            if bits * abs(float(exponent)) > MAX_RESULT_BITS:
                raise LatexError(f"power result larger than {MAX_RESULT_BITS} bits")
    return sympy.Pow(base, exponent)


class _Parser:
    """Recursive descent over the LaTeX subset of the module docstring.

    sum := product (('+'|'-') product)*
    product := signed ((op | implicit) signed)*    op: * \\cdot \\times / \\div
    signed := ('+'|'-')* power
    power := atom ('^' signed)?
    atom := NUMBER | LETTER | \\pi | (sum) | {sum} | [sum] | \\frac G G | \\sqrt([sum])? G
    """

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0

    def parse(self) -> sympy.Expr:
        if not self.tokens:
            raise LatexError("empty answer")
        value = self._sum(0)
        if self.pos != len(self.tokens):
            raise LatexError(f"unexpected token {self.tokens[self.pos]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise LatexError("answer ends early")
        self.pos += 1
        return token

    def _sum(self, depth: int) -> sympy.Expr:
        if depth > MAX_DEPTH:
            raise LatexError(f"nested deeper than {MAX_DEPTH}")
        value = self._product(depth)
        while self._peek() in ("+", "-"):
            sign = 1 if self._take() == "+" else -1
            value = value + sign * self._product(depth)
        return value

    def _starts_atom(self, token: str | None) -> bool:
        return token is not None and (
            _is_number(token)
            or _is_letter(token)
            or token in ("(", "{", "[", "\\pi", "\\frac", "\\sqrt")
        )

    def _product(self, depth: int) -> sympy.Expr:
        value = self._signed(depth)
        while True:
            token = self._peek()
            if token in _MULTIPLY:
                self.pos += 1
                value = value * self._signed(depth)
            elif token in _DIVIDE:
                self.pos += 1
                value = value / self._signed(depth)
            elif self._starts_atom(token):
                value = value * self._power(depth)
            else:
                return value

    def _signed(self, depth: int) -> sympy.Expr:
        sign = 1
        while self._peek() in ("+", "-"):
            sign *= 1 if self._take() == "+" else -1
        return sign * self._power(depth)

    def _power(self, depth: int) -> sympy.Expr:
        base = self._atom(depth)
        if self._peek() != "^":
            return base
        if depth > MAX_DEPTH:  # `2^2^2^…` recurses here without passing through _sum.
            raise LatexError(f"nested deeper than {MAX_DEPTH}")
        self.pos += 1
        return _checked_power(base, self._signed(depth + 1))

    def _group(self, depth: int) -> sympy.Expr:
        """A `{…}` argument, or a single digit or token as in `\\frac12`."""
        token = self._peek()
        if token is not None and token[0] in "0123456789" and len(token) > 1:
            self.tokens[self.pos] = token[1:]
            return sympy.Integer(token[0])
        return self._atom(depth)

    def _atom(self, depth: int) -> sympy.Expr:
        token = self._take()
        if _is_number(token):
            return sympy.Rational(token)
        if _is_letter(token):
            return sympy.Symbol(token)
        if token == "\\pi":
            return sympy.pi
        if token in _CLOSING:
            value = self._sum(depth + 1)
            if self._take() != _CLOSING[token]:
                raise LatexError(f"unbalanced {token!r}")
            return value
        if token == "\\frac":
            numerator = self._group(depth + 1)
            return numerator / self._group(depth + 1)
        if token == "\\sqrt":
            if self._peek() == "[":
                self.pos += 1
                index = self._sum(depth + 1)
                if self._take() != "]":
                    raise LatexError("unbalanced '['")
                return _checked_power(self._group(depth + 1), 1 / index)
            return sympy.sqrt(self._group(depth + 1))
        raise LatexError(f"unexpected token {token!r}")


def parse_answer(answer: str) -> sympy.Expr:
    """Parses a normalised answer into a sympy expression without any `eval`.

    Raises LatexError when the answer is outside the supported subset or size limits.
    """
    try:
        return _Parser(_tokenize(answer)).parse()
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
        if isinstance(e, LatexError):
            raise
        raise LatexError(f"{type(e).__name__}: {e}") from e


def _is_finite(expr: sympy.Expr) -> bool:
    return not expr.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan)


def answers_equivalent(predicted: str, reference: str) -> bool:
    """Whether two normalised answers are equal as numbers or as symbolic expressions.

    Multi-letter runs (words, units) are not compared symbolically: `ab` would otherwise
    equal `ba`. Raises LatexError when either side cannot be parsed.
    """
    if re.search(r"[a-zA-Z]{2}", re.sub(r"\\[a-zA-Z]+", " ", predicted + " " + reference)):
        return False
    a, b = parse_answer(predicted), parse_answer(reference)
    if not (_is_finite(a) and _is_finite(b)):
        return False
    difference = a - b
    if difference == 0:
        return True
    if difference.is_Rational:  # Exact and nonzero: no tolerance for `2^{100}` vs `2^{100}+1`.
        return False
    if difference.is_number:
        scale = max(1.0, abs(complex(sympy.N(b, 30)))) if b.is_number else 1.0
        return abs(complex(sympy.N(difference, 30))) <= RELATIVE_TOLERANCE * scale
    return sympy.simplify(difference) == 0


def math_reward(response: str, meta: Mapping[str, Any]) -> RewardResult:
    """Scores a response against `meta = {"answer": reference}`: 1.0 if the last boxed
    answer matches the reference exactly after normalisation or is equivalent to it, else
    0.0. A reference that itself contains `\\boxed{}` is compared by its boxed content.
    """
    boxed = extract_last_boxed(response)
    if boxed is None:
        return RewardResult(0.0, "no_boxed")
    reference = str(meta["answer"])
    predicted = normalize_answer(boxed)
    reference = normalize_answer(extract_last_boxed(reference) or reference)
    if predicted == reference:
        return RewardResult(1.0, "correct: exact")
    try:
        equivalent = answers_equivalent(predicted, reference)
    except LatexError as e:
        return RewardResult(0.0, f"unparsed: {e}")
    except Exception as e:  # sympy can fail in many ways on odd but parseable input.
        return RewardResult(0.0, f"error: {type(e).__name__}")
    if equivalent:
        return RewardResult(1.0, "correct: equivalent")
    return RewardResult(0.0, "wrong")
