"""Reward registry and batch scoring in worker processes with a hard per-item time limit.

Each response is scored in a worker process. A worker that has not answered within
`timeout_s` of receiving its item is killed and replaced, and the item scores 0 with
reason `timeout`; a worker that dies scores its item 0 with reason `worker_died`. So
a verifier that hangs (sympy on an adversarial expression) costs at most `timeout_s`
and never stalls the training loop. Workers are started with `spawn` by default: the
trainer process runs JAX threads, which `fork` would copy in an undefined state.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import numpy as np

from deltal_jax.rewards.countdown import countdown_reward
from deltal_jax.rewards.format import format_reward
from deltal_jax.rewards.math import math_reward
from deltal_jax.rewards.result import RewardResult

RewardFn = Callable[..., RewardResult]

REWARD_FNS: dict[str, RewardFn] = {
    "countdown": countdown_reward,
    "math": math_reward,
    "format": format_reward,
}

MAX_REASON_CHARS = 200


def get_reward_fn(name: str) -> RewardFn:
    """Returns the reward function registered under `name`."""
    if name not in REWARD_FNS:
        raise ValueError(f"unknown verifier {name!r}; accepted: {sorted(REWARD_FNS)}")
    return REWARD_FNS[name]


def safe_reward(
    fn: RewardFn, response: Any, meta: Mapping[str, Any], kwargs: Mapping[str, Any]
) -> RewardResult:
    """`fn(response, meta, **kwargs)` with every exception scored 0 and a bounded reason."""
    try:
        result = fn(response, meta, **kwargs)
        return RewardResult(float(result.score), str(result.reason)[:MAX_REASON_CHARS])
    except Exception as e:
        return RewardResult(0.0, f"error: {type(e).__name__}")


def _worker_main(conn: Connection) -> None:
    """Worker loop: announce readiness, then score items until a `None` arrives."""
    conn.send("ready")
    while (item := conn.recv()) is not None:
        conn.send(safe_reward(*item))


class _Worker:
    def __init__(self, ctx: multiprocessing.context.BaseContext):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.item: int | None = None  # index in flight
        self.deadline = float("inf")

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        with contextlib.suppress(OSError, ValueError):  # already dead or closed
            worker.conn.send(None)
    for worker in workers:
        worker.process.join(timeout=2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    workers.clear()


class RewardPool:
    """A fixed number of verifier processes, reused across training steps.

    Use as a context manager or call `close()`; leftover workers are also shut down when
    the pool is garbage collected and, being daemons, when the trainer exits.
    """

    def __init__(self, num_workers: int = 2, *, start_method: str = "spawn"):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._ctx = multiprocessing.get_context(start_method)
        self._workers = [_Worker(self._ctx) for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx)

    def map(
        self,
        fn: RewardFn,
        responses: Sequence[Any],
        metas: Sequence[Mapping[str, Any]],
        *,
        timeout_s: float,
        kwargs: Mapping[str, Any] | None = None,
    ) -> list[RewardResult]:
        """Scores `fn(responses[i], metas[i], **kwargs)` for all i, each within `timeout_s`.

        `fn` must be importable by name in a fresh process (a module-level function).
        """
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        if len(responses) != len(metas):
            raise ValueError(f"{len(responses)} responses but {len(metas)} metadata entries")
        kwargs = dict(kwargs or {})
        results: list[RewardResult | None] = [None] * len(responses)
        pending = collections.deque(range(len(responses)))
        while pending or any(w.item is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.item is None and pending:
                    index = pending.popleft()
                    try:
                        worker.conn.send((fn, responses[index], metas[index], kwargs))
                    except Exception as e:  # unpicklable input or a dead pipe
                        results[index] = RewardResult(0.0, f"error: {type(e).__name__}")
                        self._replace(worker)
                        continue
                    worker.item, worker.deadline = index, time.monotonic() + timeout_s
            now = time.monotonic()
            wait_s = min(w.deadline for w in self._workers) - now
            conns = {w.conn: w for w in self._workers}
            for conn in wait(list(conns), timeout=max(0.0, min(wait_s, 1.0))):
                worker = conns[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    if not worker.ready:
                        raise RuntimeError(
                            f"reward worker exited with code {worker.process.exitcode} "
                            "before starting; is deltal_jax importable in a fresh process?"
                        ) from None
                    if worker.item is not None:
                        results[worker.item] = RewardResult(0.0, "worker_died")
                    self._replace(worker)
                    continue
                if message == "ready":
                    worker.ready = True
                else:
                    results[worker.item] = message
                    worker.item, worker.deadline = None, float("inf")
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.item is not None and now >= worker.deadline:
                    results[worker.item] = RewardResult(0.0, "timeout")
                    self._replace(worker)
        return results


class ScoredBatch(NamedTuple):
    """Scores `[N] float32` and one reason string per response."""

    scores: np.ndarray
    reasons: list[str]


def score_batch(
    responses: Sequence[str],
    metas: Sequence[Mapping[str, Any]],
    verifier: str,
    *,
    timeout_s: float = 5.0,
    num_workers: int = 2,
    pool: RewardPool | None = None,
    reward_kwargs: Mapping[str, Any] | None = None,
) -> ScoredBatch:
    """Scores each response with the verifier registered under `verifier`.

    Runs in `pool` when given (the trainer keeps one for the whole run), else in a
    temporary pool of `num_workers` processes that is shut down before returning. Never
    raises on model output: failures, crashes and timeouts score 0.
    """
    fn = get_reward_fn(verifier)
    if pool is None:
        with RewardPool(num_workers) as own_pool:
            results = own_pool.map(fn, responses, metas, timeout_s=timeout_s, kwargs=reward_kwargs)
    else:
        results = pool.map(fn, responses, metas, timeout_s=timeout_s, kwargs=reward_kwargs)
    scores = np.asarray([r.score for r in results], dtype=np.float32).reshape(len(results))
    return ScoredBatch(scores, [r.reason for r in results])


def count_reasons(reasons: Sequence[str]) -> dict[str, int]:
    """Counts reasons by keyword (the part before `:`), for logging."""
    return dict(collections.Counter(reason.split(":")[0] for reason in reasons))
