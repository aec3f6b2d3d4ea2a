"""Procedurally generated Countdown instances, their solutions, and disjoint splits.

An instance is a list of numbers and a target reachable from them with + − × ÷, each
number used once (TinyZero-style). Instances are drawn from a seeded numpy Generator,
so a seed fixes a split exactly. Train and test never share an instance: the split of
(sorted numbers, target) is fixed by a hash of it, independent of seeds and sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

SPLITS = ("train", "test")

# Precedence of an expression's top-level operator; literals bind tightest.
_ATOM, _PRODUCT, _SUM = 3, 2, 1
_PRECEDENCE = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT}


@dataclasses.dataclass(frozen=True)
class CountdownSpec:
    """Ranges of generated instances; defaults suit a tiny model."""

    num_numbers: tuple[int, ...] = (3, 4)  # each instance draws its count from these
    min_number: int = 1
    max_number: int = 20
    max_target: int = 100  # targets lie in [1, max_target]
    test_fraction: float = 0.1  # share of the instance space assigned to "test"

    def __post_init__(self):
        if not self.num_numbers or min(self.num_numbers) < 2 or max(self.num_numbers) > 6:
            raise ValueError(f"num_numbers must be counts in [2, 6], got {self.num_numbers}")
        if not 0 <= self.min_number <= self.max_number:
            raise ValueError(
                f"need 0 <= min_number <= max_number, got {self.min_number}, {self.max_number}"
            )
        if self.max_target < 1:
            raise ValueError(f"max_target must be >= 1, got {self.max_target}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


class CountdownInstance(NamedTuple):
    numbers: tuple[int, ...]
    target: int
    solution: str  # one expression using each number once that equals target


class _Term(NamedTuple):
    value: Fraction
    text: str
    precedence: int


def _combine(lhs: _Term, op: str, rhs: _Term) -> _Term | None:
    """`lhs op rhs` with the fewest parentheses, or None for division by zero."""
    if op == "/" and rhs.value == 0:
        return None
    value = {
        "+": lambda: lhs.value + rhs.value,
        "-": lambda: lhs.value - rhs.value,
        "*": lambda: lhs.value * rhs.value,
        "/": lambda: lhs.value / rhs.value,
    }[op]()
    precedence = _PRECEDENCE[op]
    left = f"({lhs.text})" if lhs.precedence < precedence else lhs.text
    # a - (b + c) and a / (b * c) need parentheses on the right at equal precedence.
    right_tight = rhs.precedence < precedence or (rhs.precedence == precedence and op in "-/")
    right = f"({rhs.text})" if right_tight else rhs.text
    return _Term(value, f"{left} {op} {right}", precedence)


def _leaf(n: int) -> _Term:
    return _Term(Fraction(n), str(n), _ATOM)


def _random_expression(rng: np.random.Generator, numbers: Sequence[int]) -> _Term | None:
    """Combines random pairs with random operations, keeping intermediates positive
    integers (a tiny model learns such solutions more easily); None on a dead end."""
    terms = [_leaf(n) for n in numbers]
    while len(terms) > 1:
        i, j, op = rng.integers(len(terms)), rng.integers(len(terms) - 1), rng.integers(4)
        j += j >= i  # a second, distinct index
        lhs, rhs = terms[i], terms[j]
        if lhs.value < rhs.value:
            lhs, rhs = rhs, lhs
        combined = _combine(lhs, "+-*/"[op], rhs)
        if combined is None or combined.value <= 0 or combined.value.denominator != 1:
            return None
        terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [combined]
    return terms[0]


def sample_instance(rng: np.random.Generator, spec: CountdownSpec) -> CountdownInstance:
    """Draws numbers, then a random expression over them whose value is a valid target."""
    while True:
        count = spec.num_numbers[rng.integers(len(spec.num_numbers))]
        numbers = tuple(int(n) for n in rng.integers(spec.min_number, spec.max_number + 1, count))
        for _ in range(20):
            term = _random_expression(rng, numbers)
            if term is not None and 1 <= term.value <= spec.max_target:
                return CountdownInstance(numbers, int(term.value), term.text)


def instance_split(numbers: Sequence[int], target: int, test_fraction: float) -> str:
    """ "train" or "test" by a stable hash of (sorted numbers, target)."""
    key = f"{sorted(int(n) for n in numbers)}:{int(target)}".encode()
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return "test" if digest / 2**64 < test_fraction else "train"


def generate_split(
    split: str, num_examples: int, seed: int, spec: CountdownSpec = CountdownSpec()
) -> list[dict[str, Any]]:
    """The first `num_examples` distinct instances of `split` drawn from `seed`.

    Returns records `{"id", "numbers", "target", "solution"}` with `id` the position in
    the split. Raises ValueError when the spec's space is too small to supply them.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {SPLITS}")
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    seen: set[tuple[tuple[int, ...], int]] = set()
    budget = 200 * num_examples + 10_000
    for _ in range(budget):
        if len(records) == num_examples:
            break
        instance = sample_instance(rng, spec)
        key = (tuple(sorted(instance.numbers)), instance.target)
        if key in seen or instance_split(*key, spec.test_fraction) != split:
            continue
        seen.add(key)
        records.append(
            {"id": len(records), **instance._asdict(), "numbers": list(instance.numbers)}
        )
    if len(records) < num_examples:
        raise ValueError(
            f"found only {len(records)} of {num_examples} distinct {split!r} instances; "
            "widen the number or target ranges of the CountdownSpec"
        )
    return records


def _expressions(terms: list[_Term]) -> Iterator[_Term]:
    """Every expression tree over `terms`, each used once, with any rational intermediate."""
    if len(terms) == 1:
        yield terms[0]
        return
    for i in range(len(terms)):
        for j in range(len(terms)):
            if i == j:
                continue
            rest = [t for k, t in enumerate(terms) if k not in (i, j)]
            for op in "+-*/":
                # + and * are commutative: one operand order is enough.
                if op in "+*" and i > j:
                    continue
                combined = _combine(terms[i], op, terms[j])
                if combined is not None:
                    yield from _expressions([*rest, combined])


def solve(numbers: Sequence[int], target: int, max_solutions: int | None = None) -> list[str]:
    """Distinct expressions using each number once that equal `target`, shortest first.

    Exhaustive (exponential in the count): meant for the 3–5 numbers of the task.
    """
    found = {
        term.text for term in _expressions([_leaf(int(n)) for n in numbers]) if term.value == target
    }
    return sorted(found, key=lambda text: (len(text), text))[:max_solutions]


class Trace(NamedTuple):
    """A worked solution: the steps in order (`"9-3=6"`) and the expression they build."""

    steps: tuple[str, ...]
    expression: str


def solution_traces(numbers: Sequence[int], target: int) -> list[Trace]:
    """Every step-by-step solution whose intermediates are positive integers.

    Each step combines two remaining values, larger first (`a op b = v` with a ≥ b), so a
    trace reads like hand-worked arithmetic. These are the worked solutions a tiny model
    is warmed up on: each step is a small arithmetic fact shared across instances, which
    transfers to held-out instances where a bare final expression does not. Sorted, so
    the list is deterministic.
    """
    found: set[Trace] = set()

    def extend(terms: list[_Term], steps: tuple[str, ...]) -> None:
        if len(terms) == 1:
            if terms[0].value == target:
                found.add(Trace(steps, terms[0].text.replace(" ", "")))
            return
        for i, lhs in enumerate(terms):
            for j, rhs in enumerate(terms):
                if i == j or lhs.value < rhs.value:
                    continue
                rest = [t for k, t in enumerate(terms) if k not in (i, j)]
                for op in "+-*/":
                    combined = _combine(lhs, op, rhs)
                    if combined is None or combined.value <= 0 or combined.value.denominator != 1:
                        continue
                    step = f"{lhs.value}{op}{rhs.value}={combined.value}"
                    extend([*rest, combined], (*steps, step))

    extend([_leaf(int(n)) for n in numbers], ())
    return sorted(found)
