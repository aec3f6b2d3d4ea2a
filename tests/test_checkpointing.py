"""Checkpoint round trips, sharded restore, pruning, atomicity under SIGKILL, SIGTERM flag."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deltal_jax.checkpointing import Checkpointer, install_preemption_handler


class Tracker(NamedTuple):
    mean: jax.Array
    count: jax.Array


def make_state(seed: int) -> dict:
    """A train-state-like pytree whose every leaf depends on `seed`."""
    model = nnx.Linear(3, 5, rngs=nnx.Rngs(seed))
    _, params = nnx.split(model)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (seed + 1)), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments and count
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(seed),
        "rng": jax.random.fold_in(jax.random.key(17), seed),
        "tracker": Tracker(mean=jnp.float32(seed) / 3, count=jnp.int32(seed)),
        "scale": jnp.bfloat16(1.5 + seed),
    }


def bitwise_leaves(tree) -> list[tuple[str, tuple, bytes]]:
    """(dtype, shape, raw bytes) of every leaf; typed keys through their key data."""
    out = []
    for leaf in jax.tree.leaves(tree):
        dtype = str(leaf.dtype)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.asarray(leaf)
        out.append((dtype, array.shape, array.tobytes()))
    return out


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert bitwise_leaves(a) == bitwise_leaves(b)


def test_round_trip_is_bitwise_exact_and_keeps_pytree_types(tmp_path):
    state = {**make_state(2), "host": np.array([1, 2**40], np.int64)}
    ckpt = Checkpointer(str(tmp_path), save_every=1)
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, data_state={"next_index": 42}, extra={"episodes": 9})
    ckpt.close()

    resumed = Checkpointer(str(tmp_path))
    assert resumed.latest_step() == 7
    like = {**make_state(0), "host": np.zeros(2, np.int64)}  # other values, same shapes
    restored, data_state, extra = resumed.restore(like)
    resumed.close()

    assert_bitwise_equal(restored, state)
    assert data_state == {"next_index": 42}
    assert extra == {"episodes": 9}
    assert isinstance(restored["params"], nnx.State)
    assert isinstance(restored["tracker"], Tracker)
    assert isinstance(restored["host"], np.ndarray)
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.uniform(restored["rng"], (4,)), jax.random.uniform(state["rng"], (4,))
    )
    # The restored params drive the model exactly like the saved ones.
    graphdef, _ = nnx.split(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(
        nnx.merge(graphdef, restored["params"])(x), nnx.merge(graphdef, state["params"])(x)
    )


def test_restore_from_abstract_state(tmp_path):
    state = make_state(1)
    ckpt = Checkpointer(str(tmp_path), save_every=1)
    ckpt.save(1, state, data_state={})
    restored, _, extra = ckpt.restore(jax.eval_shape(lambda: state))
    ckpt.close()
    assert_bitwise_equal(restored, state)
    assert extra == {}


def test_restore_places_arrays_on_requested_shardings(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    kernel = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    keys = jax.random.split(jax.random.key(0), 8)
    state = {"kernel": kernel, "keys": keys, "step": jnp.int32(3)}  # saved unsharded
    shardings = {
        "kernel": NamedSharding(mesh, P("data", "model")),
        "keys": NamedSharding(mesh, P("data")),
        "step": NamedSharding(mesh, P()),
    }
    state_like = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    ckpt = Checkpointer(str(tmp_path), save_every=1)
    ckpt.save(1, state, data_state={})
    restored, _, _ = ckpt.restore(state_like)
    ckpt.close()

    for name, sharding in shardings.items():
        assert restored[name].sharding == sharding, name
    assert len(restored["kernel"].addressable_shards) == 8
    assert restored["kernel"].addressable_shards[0].data.shape == (2, 3)
    assert_bitwise_equal(restored, state)


def test_buffers_may_be_freed_right_after_async_save(tmp_path):
    # The train step donates its state: save must have copied it off the device already.
    expected = np.arange(2**20, dtype=np.float32)
    x = jnp.asarray(expected)
    ckpt = Checkpointer(str(tmp_path), save_every=1)
    ckpt.save(1, {"x": x}, data_state={})
    x.delete()
    ckpt.close()
    resumed = Checkpointer(str(tmp_path))
    restored, _, _ = resumed.restore({"x": jnp.zeros_like(expected)})
    resumed.close()
    np.testing.assert_array_equal(restored["x"], expected)


def test_should_save_and_save_gating(tmp_path):
    ckpt = Checkpointer(str(tmp_path), save_every=5)
    assert [s for s in range(12) if ckpt.should_save(s)] == [0, 5, 10]
    state = {"x": jnp.ones(2)}
    assert not ckpt.save(3, state, data_state={})
    assert ckpt.save(3, state, data_state={}, force=True)
    assert ckpt.save(5, state, data_state={})
    ckpt.wait_until_finished()
    assert not ckpt.save(5, state, data_state={}, force=True)  # already on disk
    ckpt.close()
    assert sorted(int(name) for name in os.listdir(tmp_path)) == [3, 5]


def test_max_to_keep_prunes_oldest(tmp_path):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2, save_every=1)
    for step in range(1, 6):
        ckpt.save(step, {"x": jnp.full(3, step)}, data_state={"i": step})
    ckpt.close()
    assert sorted(int(name) for name in os.listdir(tmp_path)) == [4, 5]
    resumed = Checkpointer(str(tmp_path))
    assert resumed.all_steps() == [4, 5]
    assert resumed.latest_step() == 5
    state, data_state, _ = resumed.restore({"x": jnp.zeros(3, jnp.int32)}, step=4)
    resumed.close()
    np.testing.assert_array_equal(state["x"], np.full(3, 4))
    assert data_state == {"i": 4}


def test_unfinished_temporary_directory_is_ignored_and_removed(tmp_path):
    ckpt = Checkpointer(str(tmp_path), save_every=1)
    ckpt.save(2, make_state(2), data_state={"i": 2})
    ckpt.close()
    # A step-3 save killed before Orbax renamed it: a complete-looking copy under the
    # temporary name, with one item's files missing.
    tmp_dir = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "2", tmp_dir)
    shutil.rmtree(tmp_dir / "state")

    resumed = Checkpointer(str(tmp_path), save_every=1)
    assert resumed.latest_step() == 2
    restored, data_state, _ = resumed.restore(make_state(0))
    assert_bitwise_equal(restored, make_state(2))
    assert data_state == {"i": 2}
    resumed.save(3, make_state(3), data_state={"i": 3})  # waits for the start-up cleanup
    resumed.close()
    assert not tmp_dir.exists()
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from deltal_jax.checkpointing import Checkpointer

    def state(step):  # 16 MiB, so the last save is still being written when killed
        return {"w": jnp.arange(4 * 2**20, dtype=jnp.float32) * step, "step": jnp.int32(step)}

    ckpt = Checkpointer(sys.argv[1], save_every=1, max_to_keep=5)
    for step in (1, 2, 3):
        ckpt.save(step, state(step), data_state={"i": step})
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_during_async_save_resumes_from_a_complete_step(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    killed_mid_save = any("tmp" in name for name in os.listdir(tmp_path))

    ckpt = Checkpointer(str(tmp_path))
    step = ckpt.latest_step()
    assert step == 2 if killed_mid_save else step in (2, 3)
    like = {"w": jnp.zeros(4 * 2**20, jnp.float32), "step": jnp.int32(0)}
    state, data_state, _ = ckpt.restore(like)
    ckpt.close()
    assert int(state["step"]) == step
    assert data_state == {"i": step}
    np.testing.assert_array_equal(state["w"], np.arange(4 * 2**20, dtype=np.float32) * step)


def wait_for(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_sigterm_sets_flag_and_handler_is_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with install_preemption_handler() as preempted:
        assert signal.getsignal(signal.SIGTERM) != previous
        assert not preempted()
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(preempted)
    assert signal.getsignal(signal.SIGTERM) == previous


def test_preemption_handler_off_main_thread_warns_and_stays_false():
    previous = signal.getsignal(signal.SIGTERM)
    result = {}

    def install():
        with pytest.warns(UserWarning, match="main thread"):
            result["flag"] = install_preemption_handler()

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert result["flag"]() is False
    assert signal.getsignal(signal.SIGTERM) == previous
