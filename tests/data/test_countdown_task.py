"""Countdown generation: determinism, solvability checked by the safe evaluator, splits."""

from collections import Counter

import pytest

from deltal_jax.data.countdown import (
    CountdownSpec,
    generate_split,
    instance_split,
    solution_traces,
    solve,
)
from deltal_jax.rewards.countdown import countdown_reward, evaluate_expression


def _keys(records):
    return {(tuple(sorted(r["numbers"])), r["target"]) for r in records}


def test_same_seed_same_records_different_seed_different():
    assert generate_split("train", 100, seed=3) == generate_split("train", 100, seed=3)
    assert generate_split("train", 100, seed=3) != generate_split("train", 100, seed=4)


def test_reference_solutions_reach_the_target_with_each_number_once():
    spec = CountdownSpec(num_numbers=(3, 4), max_number=20, max_target=100)
    records = generate_split("train", 300, seed=0, spec=spec)
    assert {len(r["numbers"]) for r in records} == {3, 4}
    for r in records:
        value, used = evaluate_expression(r["solution"])
        assert value == r["target"]
        assert Counter(used) == Counter(r["numbers"])
        assert 1 <= r["target"] <= 100
        assert all(1 <= n <= 20 for n in r["numbers"])
        meta = {"numbers": r["numbers"], "target": r["target"]}
        assert countdown_reward(f"<answer>{r['solution']}</answer>", meta).score == 1.0
    assert [r["id"] for r in records] == list(range(300))
    assert len(_keys(records)) == 300  # distinct instances


def test_splits_are_disjoint_and_follow_the_hash():
    spec = CountdownSpec(test_fraction=0.2)
    train = generate_split("train", 400, seed=0, spec=spec)
    test = generate_split("test", 100, seed=0, spec=spec)  # same seed on purpose
    assert not _keys(train) & _keys(test)
    assert {instance_split(*k, 0.2) for k in _keys(train)} == {"train"}
    assert {instance_split(*k, 0.2) for k in _keys(test)} == {"test"}


def test_hash_split_assigns_about_the_test_fraction():
    keys = [
        ((a, b, c), t) for a in range(1, 11) for b in range(a, 11) for c in (1, 2) for t in (7, 9)
    ]
    share = sum(instance_split(n, t, 0.1) == "test" for n, t in keys) / len(keys)
    assert 0.06 < share < 0.14
    # The split ignores the order the numbers are shown in.
    assert instance_split([3, 1, 2], 6, 0.5) == instance_split([1, 2, 3], 6, 0.5)


@pytest.mark.parametrize(("numbers", "target"), [((3, 5, 7), 22), ((1, 3, 4, 6), 24), ((2, 2), 4)])
def test_solve_returns_only_valid_distinct_solutions(numbers, target):
    solutions = solve(numbers, target)
    assert solutions and len(solutions) == len(set(solutions))
    assert [len(s) for s in solutions] == sorted(len(s) for s in solutions)
    meta = {"numbers": list(numbers), "target": target}
    for s in solutions:
        assert countdown_reward(f"<answer>{s}</answer>", meta).score == 1.0
    assert solve(numbers, target, max_solutions=1) == solutions[:1]


def test_solve_known_cases():
    assert "6 / (1 - 3 / 4)" in solve([1, 3, 4, 6], 24)  # needs a fractional intermediate
    assert set(solve([2, 3], 6)) == {"2 * 3"}
    assert solve([1, 1], 5) == []


def test_generator_solutions_are_found_by_the_solver():
    for r in generate_split("train", 30, seed=1, spec=CountdownSpec(num_numbers=(3,))):
        solutions = solve(r["numbers"], r["target"])
        assert solutions and all(evaluate_expression(s)[0] == r["target"] for s in solutions)


def test_bad_specs_and_exhausted_spaces_are_clear_errors():
    with pytest.raises(ValueError, match="num_numbers must be counts in"):
        CountdownSpec(num_numbers=(1,))
    with pytest.raises(ValueError, match="test_fraction"):
        CountdownSpec(test_fraction=0.0)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        generate_split("valid", 1, seed=0)
    tiny = CountdownSpec(num_numbers=(2,), min_number=1, max_number=1, test_fraction=0.5)
    with pytest.raises(ValueError, match="found only .* widen"):
        generate_split("train", 5, seed=0, spec=tiny)


def _replay(steps):
    """Values each step claims, checked by exact arithmetic; returns the last."""
    value = None
    for step in steps:
        expr, claimed = step.split("=")
        value, _ = evaluate_expression(expr)
        assert value == int(claimed) and value > 0
    return value


@pytest.mark.parametrize(
    ("numbers", "target"), [((7, 7, 1), 13), ((3, 5, 2, 8), 24), ((9, 3, 4), 24)]
)
def test_solution_traces_are_correct_worked_solutions(numbers, target):
    traces = solution_traces(numbers, target)
    assert traces and traces == sorted(set(traces))
    meta = {"numbers": list(numbers), "target": target}
    for trace in traces:
        assert len(trace.steps) == len(numbers) - 1
        assert _replay(trace.steps) == target
        assert countdown_reward(f"<answer>{trace.expression}</answer>", meta).score == 1.0
        # Steps write the larger operand first.
        for step in trace.steps:
            lhs = step.split("=")[0]
            a, b = (int(x) for x in lhs.replace("+", " ").replace("-", " ").replace(
                "*", " ").replace("/", " ").split())  # fmt: skip
            assert a >= b


def test_solution_traces_known_case_and_fraction_only_instances():
    assert {t.steps for t in solution_traces([9, 3, 4], 24)} >= {("9-3=6", "6*4=24")}
    # 6 / (1 - 3/4) is the only solution, and it needs a fractional intermediate.
    assert solve([1, 3, 4, 6], 24) == ["6 / (1 - 3 / 4)"]
    assert solution_traces([1, 3, 4, 6], 24) == []
    assert solution_traces([1, 1], 5) == []
