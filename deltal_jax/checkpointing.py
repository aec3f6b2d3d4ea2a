"""Orbax checkpoints of the whole training state, for exact resume.

One checkpoint step holds three items:

  state   the training pytree (policy params as an `nnx.State`, optax state, step, PRNG
          key, behaviour-policy params, tracker NamedTuples), written with
          `StandardSave` so every host writes its own shards
  data    the grain iterator's `get_state()` (JSON)
  extra   free-form JSON counters

The pytree goes to disk as plain nested dicts keyed by the leaves' paths, and typed PRNG
keys as their `uint32` key data. Restoring unflattens with the caller's `state_like`, so
the caller's own node types (`nnx.State`, `Variable`, NamedTuples, optax states) come
back unchanged without Orbax having to know any of them, and any checkpoint can be read
by plain Orbax without this package.

Atomicity: Orbax writes each step into `<step>.orbax-checkpoint-tmp-<n>` and renames it
to `<step>` only once every item is complete (on GCS, where there is no rename, it writes
a commit marker instead). A run killed at any point therefore resumes from the last
finalised step; unfinished temporary directories are ignored and removed at start-up.

Saves are asynchronous: `save` copies the arrays to host memory before it returns, so
the caller may donate or overwrite the device buffers right away, and the disk write
overlaps the next training steps. `close` waits for it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_STATE, _DATA, _EXTRA = "state", "data", "extra"


def _is_prng_key(leaf: Any) -> bool:
    """Whether `leaf` is a new-style typed PRNG key array (or its abstract shape)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _entry_name(entry: Any) -> str:
    """The name of one step of a pytree key path (dict key, attribute or index)."""
    for field in ("key", "name", "idx"):
        if hasattr(entry, field):
            return str(getattr(entry, field))
    raise TypeError(f"unsupported pytree key path entry {entry!r}")


def _leaf_paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """The leaves of `tree` with their paths as tuples of strings, and the treedef."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(_entry_name(entry) for entry in path) for path, _ in with_paths]
    if any(not path for path in paths):
        raise TypeError("the checkpointed state must be a pytree container, not a bare leaf")
    if len(set(paths)) != len(paths):
        raise ValueError("two leaves of the state have the same path once keys become strings")
    return paths, [leaf for _, leaf in with_paths], treedef


def _nest(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, Any]:
    """Nested dicts holding `leaves` at `paths`: the on-disk layout of the state."""
    nested: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        node = nested
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return nested


def _lookup(nested: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        nested = nested[name]
    return nested


def _to_saveable(leaf: Any) -> Any:
    """Typed PRNG keys as their raw `uint32` key data, host values as NumPy arrays."""
    if _is_prng_key(leaf):
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _restore_target(leaf: Any, default_sharding: jax.sharding.Sharding) -> Any:
    """The abstract array Orbax should restore for one leaf of `state_like`.

    Device arrays and `ShapeDtypeStruct`s restore onto their sharding (a
    `ShapeDtypeStruct` without one onto `default_sharding`); NumPy values and Python
    scalars restore as NumPy arrays.
    """
    if not isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
        return np.asarray(leaf)
    sharding = getattr(leaf, "sharding", None) or default_sharding
    shape_dtype = jax.eval_shape(jax.random.key_data, leaf) if _is_prng_key(leaf) else leaf
    return jax.ShapeDtypeStruct(shape_dtype.shape, shape_dtype.dtype, sharding=sharding)


def _from_restored(restored: Any, leaf_like: Any) -> Any:
    """A restored leaf in the form of `leaf_like`: key data back into a typed key."""
    if _is_prng_key(leaf_like):
        return jax.random.wrap_key_data(restored, dtype=leaf_like.dtype)
    return restored


class Checkpointer:
    """Saves and restores (state pytree, data-iterator state, extra JSON) by step.

    `directory` may be local or `gs://`. Keeps the `max_to_keep` most recent steps.
    Every process of a multi-host run must call `save` and `restore` for the same steps;
    each writes its own shards of the arrays and reads back the shards its devices need,
    so a checkpoint restores on any number of processes and devices. The JSON items are
    written by process 0 only and read by all, which is right for the data state because
    all hosts advance their iterators in lockstep (the state is a batch index).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 100):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(directory, options=options)

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def latest_step(self) -> int | None:
        """The newest finalised step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The finalised steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict,
        extra: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an asynchronous save of `step`; returns whether one was started.

        Skipped unless `should_save(step)` or `force` (e.g. the final step, or after
        SIGTERM), and when `step` is already on disk, so a forced save right after a
        periodic one of the same step is harmless.
        """
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        paths, leaves, _ = _leaf_paths(state)
        pytree = _nest(paths, [_to_saveable(leaf) for leaf in leaves])
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(pytree),
                _DATA: ocp.args.JsonSave(data_state),
                _EXTRA: ocp.args.JsonSave(extra or {}),
            }
        )
        return self._manager.save(step, args=args, force=True)

    def restore(self, state_like: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restores `step` (default: the latest) as `(state, data_state, extra)`.

        `state_like` has the structure of the saved state; its leaves (arrays or
        `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`) give the shape, dtype and
        sharding of each restored array, so sharded parameters load straight onto the
        mesh. The returned state has `state_like`'s pytree types.
        """
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        paths, leaves_like, treedef = _leaf_paths(state_like)
        default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        targets = [_restore_target(leaf, default_sharding) for leaf in leaves_like]
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardRestore(_nest(paths, targets)),
                _DATA: ocp.args.JsonRestore(),
                _EXTRA: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(step, args=args)
        leaves = [
            _from_restored(_lookup(restored[_STATE], path), leaf_like)
            for path, leaf_like in zip(paths, leaves_like, strict=True)
        ]
        state = jax.tree_util.tree_unflatten(treedef, leaves)
        return state, dict(restored[_DATA]), dict(restored[_EXTRA])

    def wait_until_finished(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's background threads."""
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionFlag:
    """Tells whether SIGTERM arrived; restores the previous handler on `uninstall`.

    Calling the flag in a multi-process run takes the logical OR over processes (one
    tiny all-gather), so every host sees the preemption at the same step and they save
    that step together: a save is collective, and hosts that disagreed would deadlock.
    All processes must therefore call it at the same points of the loop.
    """

    def __init__(self):
        self._received = threading.Event()
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("received signal %d: will checkpoint and stop", signum)
        self._received.set()

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def __call__(self) -> bool:
        received = self._received.is_set()
        if jax.process_count() == 1:
            return received
        return bool(np.any(multihost_utils.process_allgather(np.bool_(received))))

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.uninstall()


def install_preemption_handler() -> PreemptionFlag:
    """Turns SIGTERM (how Cloud TPU and most schedulers preempt) into a flag.

    Returns a `PreemptionFlag`: call it each step and, when True, save and exit. Use it
    as a context manager (or call `uninstall()`) to put the previous handler back.
    Signal handlers can only be set from the main thread; elsewhere (e.g. a notebook
    worker) this warns and returns a flag that stays False.
    """
    flag = PreemptionFlag()
    if threading.current_thread() is not threading.main_thread():
        warnings.warn(
            "install_preemption_handler called outside the main thread: SIGTERM will not "
            "be caught, so a preempted run loses the steps since its last checkpoint",
            stacklevel=2,
        )
        return flag
    flag.install()
    return flag
