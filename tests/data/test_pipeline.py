"""grain prompt pipeline: shapes, padding, exact resume, seeds, host sharding."""

import itertools
import json

import numpy as np
import pytest

from deltal_jax.data.builders import CountdownConfig, countdown_builder
from deltal_jax.data.countdown import CountdownSpec, generate_split
from deltal_jax.data.pipeline import pad_prompt, prompt_dataset, reward_metas
from deltal_jax.data.templates import base_prompt, countdown_problem, math_problem

RECORDS = generate_split("train", 24, seed=0)
P = 640


def encode(text):
    return list(text.encode("utf-8"))


def decode(ids, mask):
    return bytes(int(i) for i in ids[mask]).decode("utf-8")


def make(source=RECORDS, **kwargs):
    options = dict(encode=encode, pad_id=0, max_prompt_len=P, batch_size=4, seed=0)
    return prompt_dataset(source, "countdown", **(options | kwargs))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def ids_of(batches):
    return [int(i) for b in batches for i in b["example_id"]]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_pad_prompt_left_pads_and_truncates_from_the_left():
    ids, mask = pad_prompt([5, 6, 7], 5, pad_id=-1)
    np.testing.assert_array_equal(ids, [-1, -1, 5, 6, 7])
    np.testing.assert_array_equal(mask, [False, False, True, True, True])
    assert ids.dtype == np.int32 and mask.dtype == bool
    ids, mask = pad_prompt(list(range(8)), 5, pad_id=-1)
    np.testing.assert_array_equal(ids, [3, 4, 5, 6, 7])
    assert mask.all()
    with pytest.raises(ValueError, match="8 tokens > max_prompt_len=5"):
        pad_prompt(list(range(8)), 5, pad_id=-1, truncation="error")


def test_batches_hold_prompts_and_the_reward_metadata_of_their_records():
    batch = next(iter(make()))
    assert batch["prompt_ids"].shape == (4, P) and batch["prompt_ids"].dtype == np.int32
    assert batch["prompt_mask"].shape == (4, P) and batch["example_id"].dtype == np.int64
    for row, example_id, meta in zip(
        range(4), batch["example_id"], reward_metas(batch), strict=True
    ):
        record = RECORDS[example_id]
        prompt = base_prompt(countdown_problem(record["numbers"], record["target"]))
        assert decode(batch["prompt_ids"][row], batch["prompt_mask"][row]) == prompt
        assert batch["prompt"][row] == prompt
        assert not batch["prompt_mask"][row, 0]  # left padding
        assert meta == {"numbers": record["numbers"], "target": record["target"]}


def test_one_epoch_covers_every_record_once_and_epochs_reshuffle():
    two_epochs = list(make(num_epochs=2))
    assert len(two_epochs) == 12
    first, second = ids_of(two_epochs[:6]), ids_of(two_epochs[6:])
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second


def test_same_seed_same_order_different_seed_different_order():
    assert ids_of(take(iter(make(seed=1)), 6)) == ids_of(take(iter(make(seed=1)), 6))
    assert ids_of(take(iter(make(seed=1)), 6)) != ids_of(take(iter(make(seed=2)), 6))


@pytest.mark.parametrize("k", [0, 3, 7])  # 7 batches crosses the epoch boundary at 6
def test_restored_iterator_continues_with_the_same_batches(k):
    iterator = iter(make())
    take(iterator, k)
    state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON checkpoint
    expected = take(iterator, 5)
    restored = iter(make())
    restored.set_state(state)
    assert_same_batches(take(restored, 5), expected)


def test_hosts_read_disjoint_shards_that_cover_the_data():
    shards = [
        ids_of(take(iter(make(shard_index=i, shard_count=3, batch_size=2)), 12)) for i in range(3)
    ]
    # 24 records over 3 hosts: 8 each; 12 batches of 2 is three epochs per host.
    per_host = [set(ids) for ids in shards]
    assert all(len(s) == 8 for s in per_host)
    assert set().union(*per_host) == set(range(24))
    assert all(not a & b for a, b in itertools.combinations(per_host, 2))
    assert per_host[1] == {r["id"] for r in RECORDS[1::3]}


def test_tfds_source_and_math_task(tmp_path):
    config = CountdownConfig(name="pipe", spec=CountdownSpec(num_numbers=(3,)), num_train=12)
    source = countdown_builder(tmp_path, config).as_data_source("train")
    batch = next(iter(make(source)))
    by_id = {int(source[i]["id"]): source[i] for i in range(len(source))}
    for example_id, meta in zip(batch["example_id"], reward_metas(batch), strict=True):
        assert meta["numbers"] == by_id[example_id]["numbers"].tolist()

    math = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]
    dataset = prompt_dataset(
        math, "math", encode=encode, pad_id=0, max_prompt_len=P, batch_size=2, seed=0
    )
    batch = next(iter(dataset))
    by_index = {int(i): m for i, m in zip(batch["example_id"], reward_metas(batch), strict=True)}
    assert by_index == {0: {"answer": "2"}, 1: {"answer": "4"}}  # index ids without "id"
    row = int(np.argmax(batch["example_id"] == 0))
    assert batch["prompt"][row] == base_prompt(math_problem("1+1?"))


def test_chat_template_option():
    batch = next(iter(make(template="chat", apply_chat_template=lambda m: f"[{m[-1]['content']}]")))
    record = RECORDS[batch["example_id"][0]]
    assert batch["prompt"][0].startswith(
        f"[{countdown_problem(record['numbers'], record['target'])}]"
    )
    assert batch["prompt"][0].endswith("<think>")


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown task 'countdwn'; accepted: \['countdown'"):
        prompt_dataset(
            RECORDS, "countdwn", encode=encode, pad_id=0, max_prompt_len=P, batch_size=2, seed=0
        )
    with pytest.raises(ValueError, match="needs apply_chat_template"):
        make(template="chat")
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        make(shard_index=3, shard_count=3)
    with pytest.raises(ValueError, match="unknown truncation"):
        make(truncation="right")
