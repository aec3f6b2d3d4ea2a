"""The default run's tiny model: character tokenizer, supervised batches, warm-up, HF layout."""

import json
import os

import numpy as np
import pytest

from deltal_jax import warmup
from deltal_jax.data import CountdownSpec, generate_split
from deltal_jax.data.templates import compact_countdown_prompt
from deltal_jax.models import load_model, load_tokenizer


def test_char_tokenizer_round_trips_and_keeps_answer_tags_whole(tmp_path):
    tok = warmup.write_char_tokenizer(str(tmp_path))
    text = "3 7 12=22:<answer>(7+12)-3</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.backend.token_to_id(warmup.ANSWER_OPEN)) == 1
    assert len(ids) == len("3 7 12=22:") + 1 + len("(7+12)-3") + 1
    assert tok.eos_ids == (1,) and tok.pad_id == 0
    assert tok.decode([*ids, 1, 0]) == text  # EOS and padding are special: not decoded


def test_supervised_batch_layout(tmp_path):
    tok = warmup.write_char_tokenizer(str(tmp_path))
    batch = warmup.supervised_batch(["1 2 3=6:"], ["<answer>1+2+3</answer>"], tok, 12, 16)
    assert batch["prompt_mask"][0].tolist() == [False] * 4 + [True] * 8  # left-padded
    n = int(batch["resp_mask"][0].sum())
    assert n == 1 + 5 + 1 + 1  # tags, expression, EOS
    assert batch["resp_ids"][0, n - 1] == tok.eos_ids[0]
    assert np.all(batch["resp_ids"][0, n:] == tok.pad_id)


@pytest.fixture(scope="module")
def records():
    spec = CountdownSpec(num_numbers=(3,), max_number=9, max_target=30, test_fraction=0.2)
    return generate_split("train", 64, 0, spec)


def test_warm_up_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path, records):
    calls = []

    def evaluate(model, tokenizer):
        calls.append(tokenizer.vocab_size)
        return {"eval/accuracy": float(len(calls))}

    directory = str(tmp_path / "warm")
    out = warmup.build_warm_model(
        directory, records, lambda r: compact_countdown_prompt(r["numbers"], r["target"]),
        steps=30, batch_size=16, learning_rate=3e-3, seed=0, max_prompt_len=16,
        max_response_len=24, evaluate=evaluate,
    )  # fmt: skip
    assert out == directory and os.listdir(tmp_path) == ["warm"]  # no temporary left
    report = json.loads((tmp_path / "warm" / warmup.REPORT).read_text())
    assert report["before/eval/accuracy"] == 1.0 and report["after/eval/accuracy"] == 2.0
    tok = load_tokenizer(directory)
    model, cfg = load_model(directory)
    assert cfg.vocab_size == tok.vocab_size and cfg.eos_token_id == (1,)

    examples = warmup.supervised_batch(
        [compact_countdown_prompt(r["numbers"], r["target"]) for r in records],
        [warmup.answer_text(r["solution"]) for r in records], tok, 16, 24,
    )  # fmt: skip
    _, losses = warmup.warm_up(
        examples, cfg, steps=30, batch_size=16, learning_rate=3e-3, seed=0, log_every=0
    )
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])

    # A complete checkpoint is reused, not rebuilt (a resumed run keeps its warm-up).
    again = warmup.build_warm_model(
        directory, records, lambda r: "", steps=1, batch_size=1, learning_rate=1.0, seed=1,
        max_prompt_len=16, max_response_len=24, evaluate=evaluate,
    )  # fmt: skip
    assert again == directory and len(calls) == 2


def test_sampled_solutions_are_correct_varied_and_deterministic(records):
    from deltal_jax.rewards import countdown_reward

    picked, responses = warmup.sample_solutions(records, 200, seed=0)
    assert (picked, responses) == warmup.sample_solutions(records, 200, seed=0)
    assert responses != warmup.sample_solutions(records, 200, seed=1)[1]
    for r, text in zip(picked, responses, strict=True):
        meta = {"numbers": r["numbers"], "target": r["target"]}
        assert countdown_reward(text, meta).score == 1.0
        steps = text[: text.index(warmup.ANSWER_OPEN)].split()
        assert len(steps) == len(r["numbers"]) - 1 and steps[-1].endswith(f"={r['target']}")
    # The same instance is worked in different ways, and lengths vary.
    by_instance = {}
    for r, text in zip(picked, responses, strict=True):
        by_instance.setdefault(r["id"], set()).add(text)
    assert max(len(v) for v in by_instance.values()) > 1
    assert len({len(t) for t in responses}) > 3

    _, bare = warmup.sample_solutions(records, 50, seed=0, solution_format="answer")
    assert all(t.startswith(warmup.ANSWER_OPEN) for t in bare)
    with pytest.raises(ValueError, match="accepted: \\('steps', 'answer'\\)"):
        warmup.sample_solutions(records, 5, seed=0, solution_format="cot")


def test_cache_directory_is_one_per_setting(tmp_path):
    a = warmup.cache_directory(str(tmp_path), {"steps": 400, "seed": 0, "spec": (3,)})
    assert a == warmup.cache_directory(str(tmp_path), {"spec": (3,), "seed": 0, "steps": 400})
    assert a != warmup.cache_directory(str(tmp_path), {"steps": 400, "seed": 1, "spec": (3,)})
    assert os.path.dirname(a) == str(tmp_path)
