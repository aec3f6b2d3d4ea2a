"""Multi-host training on one machine: 2 CPU processes × 4 devices (JAX's multi-controller
runtime, gloo collectives) train exactly like 1 process × 8 devices, and their checkpoint
resumes in a single process. Also the CLI's multi-process flags."""

import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deltal_jax import config as config_lib
from deltal_jax import main, metrics, sharding, train
from deltal_jax.checkpointing import Checkpointer
from deltal_jax.models import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "countdown_tiny.py")
TIMEOUT_S = 600  # per launch: a hung collective fails the test instead of hanging CI


# ---------------------------------------------------------------------------------------
# CLI flags.
# ---------------------------------------------------------------------------------------


def test_distributed_flags_select_auto_detection_explicit_start_or_none():
    assert main.distributed_args(False, None, None, None) is None
    assert main.distributed_args(True, None, None, None) == {}
    explicit = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert main.distributed_args(False, *explicit.values()) == explicit
    assert main.distributed_args(True, *explicit.values()) == explicit


@pytest.mark.parametrize(
    "args, message",
    [
        ((True, "host:1234", 2, None), "missing --process_id"),
        ((False, None, 2, 0), "missing --coordinator_address"),
        ((False, "host", 2, 0), "must be HOST:PORT"),
        ((False, "host:99999", 2, 0), "must be HOST:PORT"),
        ((False, ":1234", 2, 0), "must be HOST:PORT"),
        ((False, "host:1234", 0, 0), "--num_processes=0 must be >= 1"),
        ((False, "host:1234", 2, 2), r"--process_id=2 must be in 0\.\.1"),
        ((False, "host:1234", 2, -1), r"--process_id=-1 must be in 0\.\.1"),
    ],
)
def test_bad_distributed_flags_name_the_flag(args, message):
    with pytest.raises(ValueError, match=message):
        main.distributed_args(*args)


def test_cli_rejects_incomplete_explicit_start_and_missing_workdir_before_starting_jax():
    def cli(*flags):
        return subprocess.run(
            [sys.executable, "-m", "deltal_jax.main", *flags],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip

    partial = cli("--coordinator_address=localhost:1", "--num_processes=2", "--workdir=/x")
    assert partial.returncode != 0 and "missing --process_id" in partial.stderr
    no_workdir = cli("--distributed")
    assert no_workdir.returncode != 0
    assert "needs --workdir, the same on every process" in no_workdir.stderr


# ---------------------------------------------------------------------------------------
# Host ↔ device helpers keep the single-process path as it was.
# ---------------------------------------------------------------------------------------


def test_to_global_places_like_device_put_and_to_host_returns_the_value():
    mesh = sharding.make_mesh((2, 4, 1))
    x = np.arange(8 * 4 * 5, dtype=np.float32).reshape(8, 4, 5)
    for spec in (P(sharding.BATCH), P(None, "fsdp"), P()):
        target = NamedSharding(mesh, spec)
        a, b = train.to_global(x, target), jax.device_put(x, target)
        assert a.sharding == b.sharding
        for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True):
            assert sa.device == sb.device and sa.index == sb.index
            np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))
        np.testing.assert_array_equal(train.to_host({"x": a})["x"], x)
    scores = np.array([0.0, 0.1, 1.0], np.float32)
    assert train.agree(scores, mesh) is scores  # one process: nothing to agree on


# ---------------------------------------------------------------------------------------
# 2 processes × 4 devices against 1 process × 8 devices.
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    """The test environment with `devices` CPU devices. It keeps the session's compilation
    cache (conftest.py): the single-process runs compile the same programs, and the second
    one reads them back."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))  # fmt: skip
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
    }


def launch(workdir, *, processes: int, total_steps: int, policy_dir: str = ""):
    """Starts `deltal-train` on the smoke preset (2-step warm-up, Avg@1) as `processes`
    processes sharing 8 CPU devices (see `wait`). Parameters, gradients and Adam state
    are sharded over all 8 devices (fsdp), so they span both processes."""
    flags = [
        f"--config={CONFIG}:smoke", f"--workdir={workdir}", f"--config.total_steps={total_steps}",
        "--config.warmup.steps=2", "--config.warmup.num_examples=64",
        "--config.eval.num_samples=1", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
        "--config.logging.console=False", "--config.reward.num_workers=1",
    ]  # fmt: skip
    if policy_dir:
        flags.append(f"--config.model.hf_dir={policy_dir}")
    if processes > 1:
        flags += [f"--coordinator_address=localhost:{free_port()}",
                  f"--num_processes={processes}"]  # fmt: skip
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deltal_jax.main",
                *flags,
                *([f"--process_id={i}"] if processes > 1 else []),
            ],
            env=child_env(8 // processes),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(processes)
    ]


def wait(children: list[subprocess.Popen]) -> list[str]:
    """Each child's stdout once all exited 0; else fails with their stderr. Children
    still running after TIMEOUT_S (a hung collective) are killed."""
    deadline = time.monotonic() + TIMEOUT_S
    outputs, failed = [], []
    for i, child in enumerate(children):
        try:
            out, err = child.communicate(timeout=max(deadline - time.monotonic(), 1))
            status = child.returncode
        except subprocess.TimeoutExpired:
            for c in children:
                c.kill()
            out, err = child.communicate()
            status = f"a timeout after {TIMEOUT_S} s"
        outputs.append(out)
        if status != 0:
            failed.append(f"process {i} exited with {status}:\n{err[-4000:]}")
    assert not failed, "\n".join(failed)
    return outputs


def restore(workdir, step: int, policy_dir: str):
    """(state, data_state, extra) of checkpoint `step`, restored on one device."""
    model, _ = load_model(policy_dir)
    _, params = nnx.split(model)
    tx = train.make_optimizer(config_lib.base_config())
    like = {"params": params, "opt_state": tx.init(params), "rng": jax.random.key(0)}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, data_state, extra = ckpt.restore(like, step)
    finally:
        ckpt.close()
    state["rng"] = jax.random.key_data(state["rng"])
    return state, data_state, extra


def assert_same_checkpoint(a_dir, b_dir, step, policy_dir):
    (a, a_data, a_extra), (b, b_data, b_extra) = (
        restore(d, step, policy_dir) for d in (a_dir, b_dir)
    )
    assert a_data == b_data == {"next_index": step}  # the data iterator's position
    assert a_extra == b_extra
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 30
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


def assert_same_metrics(a_rows, b_rows, steps):
    """Everything but timings equal; scalars reduced across devices to float32 rounding
    (a cross-process gloo all-reduce adds the devices' partial sums in another order than
    XLA's in-process one: the logged mean entropy can differ in its last bit)."""
    a, b = ({r["step"]: r for r in rows} for rows in (a_rows, b_rows))
    for step in steps:
        keys = {k for k in a[step] if not k.startswith(("time", "throughput"))}
        assert keys == {k for k in b[step] if not k.startswith(("time", "throughput"))}
        for key in keys:
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-6, err_msg=key)


@pytest.mark.slow
def test_two_processes_train_exactly_like_one_and_resume_in_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    # 2 × 4: process 0 builds the warm-up model while process 1 waits, then two RL steps.
    outputs = wait(launch(multi, processes=2, total_steps=2))
    assert "Process 0 of 2: 4 of 8 devices" in outputs[0]
    assert "Process 1 of 2: 4 of 8 devices" in outputs[1]
    policy_dir = str(multi / "warmup")
    assert sorted(os.listdir(multi)) == ["checkpoints", "config.json", "metrics.jsonl", "tb",
                                         "warmup"]  # fmt: skip
    # 1 × 8 runs three steps from the same warm-up model; then a single process resumes
    # the 2-process checkpoint for a third step.
    wait(launch(single, processes=1, total_steps=3, policy_dir=policy_dir))
    (resumed,) = wait(launch(multi, processes=1, total_steps=3))
    assert "Resumed from step 2" in resumed

    # Process 0 alone wrote the metrics: each step once, then the resumed step 3.
    multi_rows = metrics.read_jsonl(str(multi / "metrics.jsonl"))
    assert [r["step"] for r in multi_rows] == [0, 1, 2, 3]
    assert "warmup/after/eval/accuracy" in multi_rows[0]  # process 0's warm-up report
    single_rows = metrics.read_jsonl(str(single / "metrics.jsonl"))
    assert_same_metrics(single_rows, multi_rows, steps=(0, 1, 2, 3))
    # Same prompts, samples, rewards and updates: parameters, Adam state, RNG key and
    # data position bitwise equal after the two 2-process steps and the resumed one.
    for step in (2, 3):
        assert_same_checkpoint(single, multi, step, policy_dir)
