"""Batch scoring: registry, agreement with in-process scoring, timeouts, crashes, cleanup."""

import multiprocessing
import os
import time

import numpy as np
import pytest

from deltal_jax.rewards import (
    REWARD_FNS,
    RewardPool,
    RewardResult,
    count_reasons,
    countdown_reward,
    format_reward,
    get_reward_fn,
    math_reward,
    score_batch,
)


def hang_or_countdown(response, meta):
    """A verifier that hangs on "hang" and exits its process on "crash"."""
    if response == "hang":
        time.sleep(60)
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise RuntimeError("boom")
    return countdown_reward(response, meta)


COUNTDOWN = {"numbers": [2, 3, 4], "target": 10}


def test_unknown_verifier_lists_accepted_names():
    with pytest.raises(ValueError, match=r"unknown verifier 'gsm9k'; accepted: \['countdown', "):
        get_reward_fn("gsm9k")
    assert set(REWARD_FNS) == {"countdown", "math", "format"}


def test_score_batch_matches_in_process_scores():
    responses = [
        r"<answer>2 * 3 + 4</answer>",
        r"<answer>2 + 3 + 4</answer>",
        "x" * 1_000_000,
        "<answer>" + "(" * 100_000 + "</answer>",
        "\x00\udcff<answer>٣</answer>",
    ]
    metas = [COUNTDOWN] * len(responses)
    batch = score_batch(responses, metas, "countdown", timeout_s=10.0, num_workers=2)
    expected = [countdown_reward(r, m) for r, m in zip(responses, metas, strict=True)]
    assert batch.scores.dtype == np.float32
    np.testing.assert_array_equal(batch.scores, [1.0, 0.0, 0.0, 0.0, 0.0])
    assert batch.reasons == [e.reason for e in expected]
    assert count_reasons(batch.reasons) == {
        "correct": 1,
        "wrong_value": 1,
        "no_answer": 1,
        "invalid_expression": 2,
    }


def test_math_and_format_through_one_pool():
    with RewardPool(num_workers=2) as pool:
        maths = score_batch(
            [r"\boxed{\frac{1}{2}}", r"\boxed{10^{10^{10}}}", r"\boxed{3}"],
            [{"answer": "0.5"}, {"answer": "1"}, {"answer": "4"}],
            "math",
            timeout_s=10.0,
            pool=pool,
        )
        formats = score_batch(
            [" ok </think> <answer>1</answer>", "<answer>1</answer>"],
            [{}, {}],
            "format",
            timeout_s=10.0,
            pool=pool,
        )
    np.testing.assert_array_equal(maths.scores, [1.0, 0.0, 0.0])
    assert maths.reasons[0] == math_reward(r"\boxed{\frac{1}{2}}", {"answer": "0.5"}).reason
    np.testing.assert_array_equal(formats.scores, [1.0, 0.0])


def test_reward_kwargs_reach_the_verifier():
    batch = score_batch(
        ["<answer>2+3+4</answer>"],
        [COUNTDOWN],
        "countdown",
        timeout_s=10.0,
        num_workers=1,
        reward_kwargs={"format_score": 0.25},
    )
    np.testing.assert_array_equal(batch.scores, [0.25])


def test_timeouts_and_crashes_score_zero_and_pool_recovers():
    responses = [
        "hang",
        "<answer>2*3+4</answer>",
        "crash",
        "raise",
        "hang",
        "<answer>2*3+4</answer>",
    ]
    with RewardPool(num_workers=2) as pool:
        start = time.monotonic()
        results = pool.map(hang_or_countdown, responses, [COUNTDOWN] * 6, timeout_s=1.0)
        elapsed = time.monotonic() - start
        assert results == [
            RewardResult(0.0, "timeout"),
            RewardResult(1.0, "correct"),
            RewardResult(0.0, "worker_died"),
            RewardResult(0.0, "error: RuntimeError"),
            RewardResult(0.0, "timeout"),
            RewardResult(1.0, "correct"),
        ]
        # Two hangs of 1 s each on two workers, plus restarts; far below the 60 s sleep.
        assert elapsed < 15.0
        again = pool.map(
            hang_or_countdown, ["<answer>2*3+4</answer>"] * 3, [COUNTDOWN] * 3, timeout_s=5.0
        )
        assert [r.score for r in again] == [1.0, 1.0, 1.0]
        processes = [w.process for w in pool._workers]
    assert not any(p.is_alive() for p in processes)
    assert not [p for p in multiprocessing.active_children() if p in processes]


def test_closed_pool_and_mismatched_lengths_are_clear_errors():
    pool = RewardPool(num_workers=1)
    with pytest.raises(ValueError, match="2 responses but 1 metadata"):
        pool.map(countdown_reward, ["a", "b"], [COUNTDOWN], timeout_s=1.0)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.map(countdown_reward, ["a"], [COUNTDOWN], timeout_s=1.0)


@pytest.mark.parametrize(
    ("response", "score", "reason"),
    [
        (" reasoning </think>\n<answer> 2*3+4 </answer>\n", 1.0, "well_formed"),
        ("<think> again </think><answer>1</answer>", 0.0, "bad_tag_count"),
        (" r </think><answer>1</answer><answer>2</answer>", 0.0, "bad_tag_count"),
        (" r <answer>1</answer></think>", 0.0, "bad_tag_order"),
        (" r </think> so <answer>1</answer>", 0.0, "text_outside_tags"),
        (" r </think><answer>1</answer> done", 0.0, "text_outside_tags"),
    ],
)
def test_format_reward(response, score, reason):
    assert format_reward(response) == (score, reason)


def test_format_reward_without_think_in_prompt():
    text = "<think> r </think><answer>1</answer>"
    assert format_reward(text, think_opened_in_prompt=False).score == 1.0
    assert format_reward(text).score == 0.0
