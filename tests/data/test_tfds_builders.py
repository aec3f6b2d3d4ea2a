"""TFDS builders: build into a tmp dir in array_record (no TensorFlow) and read back."""

import json

import numpy as np
import pytest

from deltal_jax.data.builders import (
    CountdownConfig,
    countdown_builder,
    extract_gsm8k_answer,
    math_jsonl_builder,
    read_math_jsonl,
)
from deltal_jax.data.countdown import CountdownSpec, generate_split


def _by_id(source):
    return {int(source[i]["id"]): source[i] for i in range(len(source))}


def test_countdown_builder_round_trip(tmp_path):
    spec = CountdownSpec(num_numbers=(3,), max_number=10)
    config = CountdownConfig(name="tiny", spec=spec, num_train=40, num_test=8, seed=5)
    builder = countdown_builder(tmp_path, config)
    assert builder.info.splits["train"].num_examples == 40
    assert builder.info.splits["test"].num_examples == 8
    assert list((tmp_path / "deltal_countdown" / "tiny" / "1.0.0").glob("*.array_record*"))
    for split, seed, n in (("train", 5, 40), ("test", 6, 8)):
        stored = _by_id(builder.as_data_source(split))
        expected = generate_split(split, n, seed, spec)
        assert sorted(stored) == list(range(n))
        for record in expected:
            got = stored[record["id"]]
            np.testing.assert_array_equal(got["numbers"], record["numbers"])
            assert got["numbers"].dtype == np.int32
            assert int(got["target"]) == record["target"]
            assert got["solution"].decode() == record["solution"]
    # A second call with the same config reuses the build.
    again = countdown_builder(tmp_path, config)
    assert _by_id(again.as_data_source("test")).keys() == set(range(8))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_math_jsonl_builder_from_paths_and_manual_dir(tmp_path):
    rows = [{"question": f"What is {i}+{i}?", "answer": str(2 * i), "extra": i} for i in range(6)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", rows[:2])

    builder = math_jsonl_builder(tmp_path / "tfds", paths={"train": str(tmp_path / "train.jsonl")})
    stored = _by_id(builder.as_data_source("train"))
    assert {i: (r["question"].decode(), r["answer"].decode()) for i, r in stored.items()} == {
        i: (row["question"], row["answer"]) for i, row in enumerate(rows)
    }

    manual = math_jsonl_builder(tmp_path / "tfds", manual_dir=tmp_path, name="from_manual")
    assert set(manual.info.splits) == {"train", "test"}
    assert len(manual.as_data_source("test")) == 2


def test_read_math_jsonl_errors_name_file_line_and_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field\(s\) \['answer'\]"):
        read_math_jsonl(path)
    path.write_text('{"question": "q", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_math_jsonl(path)
    path.write_text('["question", "answer"]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field"):
        read_math_jsonl(path)


def test_math_jsonl_builder_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no JSONL files"):
        math_jsonl_builder(tmp_path / "tfds", manual_dir=tmp_path, name="empty")


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
        ("Total 1,200 dollars.\n#### 1,200", "1200"),
        ("a #### 1 #### 2", "2"),
        ("42", "42"),
    ],
)
def test_extract_gsm8k_answer(solution, answer):
    assert extract_gsm8k_answer(solution) == answer
