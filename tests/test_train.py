"""The training loop end to end on a tiny model: files written, exact kill-and-resume,
and the update following the aggregation identities."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltal_jax import aggregation as agg
from deltal_jax import config as config_lib
from deltal_jax import metrics, train, warmup
from deltal_jax.data import generate_split
from deltal_jax.data.templates import compact_countdown_prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(policy_dir: str, **overrides):
    sys.path.insert(0, REPO)
    from configs import countdown_tiny

    config = countdown_tiny.get_config("smoke")
    config.model.hf_dir = policy_dir
    config.logging.console = False
    for key, value in overrides.items():  # "total_steps" or "loss.alpha"
        *groups, field = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[field] = value
    return config


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny warmed-up policy in HF layout, shared by the runs below."""
    records = generate_split("train", 64, 0, tiny_spec())
    return warmup.build_warm_model(
        str(tmp_path_factory.mktemp("policy") / "warm"),
        records,
        lambda r: compact_countdown_prompt(r["numbers"], r["target"]),
        steps=3, batch_size=8, learning_rate=1e-3, seed=0, max_prompt_len=16,
        max_response_len=24,
    )  # fmt: skip


def tiny_spec():
    from deltal_jax.data import CountdownSpec

    return CountdownSpec(num_numbers=(3,), max_number=9, max_target=30, test_fraction=0.2)


def test_two_steps_write_metrics_tensorboard_and_checkpoints(policy_dir, tmp_path):
    workdir = str(tmp_path / "run")
    final = train.train(smoke_config(policy_dir), workdir)
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    for key in ("reward/mean", "response_length/mean", "loss/policy", "grad_norm", "entropy",
                "clip_frac/low", "aggregation/coef_sum_times_m", "time/sample"):  # fmt: skip
        assert np.isfinite(rows[1][key]), key
    # ΔL is unbiased: Σ c_i = 1/M on every step.
    np.testing.assert_allclose(rows[1]["aggregation/coef_sum_times_m"], 1.0, rtol=1e-5)
    # The online variance proxy Σ c_i² A_i² L_i is logged with its scale-free form
    # proxy / (Σ c_i)², from the unscaled c_i (Σ c_i = 1/M here).
    m = smoke_config(policy_dir).rollout.max_response_len
    assert rows[1]["aggregation/variance_proxy"] >= 0  # 0 when every group ties
    np.testing.assert_allclose(
        rows[1]["aggregation/variance_proxy_relative"],
        rows[1]["aggregation/variance_proxy"] * m**2, rtol=1e-4,
    )  # fmt: skip
    assert final["eval/accuracy"] == rows[-1]["eval/accuracy"]
    assert os.listdir(os.path.join(workdir, "tb"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss"]["aggregation"] == "delta-l"


def test_kl_entropy_dapo_and_semi_online_options_run_and_start_from_zero_kl(policy_dir, tmp_path):
    config = smoke_config(
        policy_dir,
        **{
            "kl.beta": 0.05, "kl.estimator": "k3", "kl.placement": "both",
            "loss.entropy_coef": 0.01, "rollout.dynamic_sampling": True,
            "rollout.max_sampling_rounds": 2, "reward.overlong_buffer": 4,
            "reward.overlong_filter": True, "rollout.sync_every": 2, "ppo.minibatches": 2,
            "ppo.epochs": 2, "loss.variant": "gspo-token",
        },
    )  # fmt: skip
    workdir = tmp_path / "options"
    train.train(config, str(workdir))
    rows = {r["step"]: r for r in metrics.read_jsonl(str(workdir / "metrics.jsonl"))}
    # Step 1 samples from the initial policy, which is also the reference: KL is 0 up to
    # the float32 difference between cached decoding and teacher forcing.
    assert abs(rows[1]["kl"]) < 1e-5
    # loss/kl is averaged over the step's 4 updates: the policy moves during them.
    # sync_every=2: step 2 still samples with the initial policy (its KL to the reference
    # stays 0) while the trained policy has moved away from it.
    assert abs(rows[2]["kl"]) < 1e-5
    assert rows[2]["loss/kl"] > 0 and rows[1]["loss/kl"] > 0
    for step in (1, 2):
        assert 1 <= rows[step]["rollout/sampling_rounds"] <= 2
        assert np.isfinite(rows[step]["loss/entropy"]) and rows[step]["loss/entropy"] < 0


def test_a_bad_config_fails_before_anything_is_built(policy_dir, tmp_path):
    config = smoke_config(policy_dir)
    config.loss.alpha = 2.0
    with pytest.raises(config_lib.ConfigError, match=r"alpha must be in \[0, 1\]"):
        train.train(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.test_train import smoke_config
    from deltal_jax import train


    def on_step(step, _):
        if step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":  # the reward pool's spawned workers re-import this file
        config = smoke_config({policy!r}, **{{"total_steps": 4}})
        train.train(config, sys.argv[1], on_step=on_step)
    """
)


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(policy_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=REPO, policy=policy_dir))
    env = {**os.environ, "PYTHONPATH": REPO}

    def run(workdir, kill_at):
        return subprocess.run(
            [sys.executable, str(driver), str(workdir), str(kill_at)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run(straight, 0).returncode == 0
    killed = run(broken, 3)
    assert killed.returncode == -signal.SIGKILL
    resumed = run(broken, 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from step" in resumed.stdout

    a = metrics.read_jsonl(str(straight / "metrics.jsonl"))
    b = metrics.read_jsonl(str(broken / "metrics.jsonl"))
    by_step = lambda rows: {r["step"]: r for r in rows}  # the resumed run rewrites steps
    a, b = by_step(a), by_step(b)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    for step in (3, 4):  # data order and sampling RNG continue, not restart
        for key in ("reward/mean", "response_length/mean", "loss/policy", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)

    params = []
    for workdir in (straight, broken):
        config = smoke_config(policy_dir, **{"total_steps": 4})
        params.append(checkpoint_params(config, str(workdir)))
    leaves_a, leaves_b = jax.tree.leaves(params[0]), jax.tree.leaves(params[1])
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def checkpoint_params(config, workdir):
    """The params of the last checkpoint in workdir, restored as the trainer does."""
    from deltal_jax.checkpointing import Checkpointer
    from deltal_jax.models import load_model

    model, _ = load_model(config.model.hf_dir)
    _, params = nnx.split(model)
    tx = train.make_optimizer(config)
    state = {"params": params, "opt_state": tx.init(params), "rng": jax.random.key(0)}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 4
    restored, _, extra = ckpt.restore(state)
    ckpt.close()
    assert extra["step"] == 4
    return restored["params"]


# ---------------------------------------------------------------------------------------
# The trainer's update step follows the aggregation identities.
# ---------------------------------------------------------------------------------------


def one_update(policy_dir, mode, alpha, rollout, microbatches=1):
    from deltal_jax.models import load_model

    config = smoke_config(policy_dir)
    config.loss.aggregation, config.loss.alpha = mode, alpha
    model, _ = load_model(policy_dir)
    graphdef, params = nnx.split(model)
    tx = train.make_optimizer(config)
    lengths = jnp.asarray(rollout["resp_mask"].sum(-1), jnp.float32)
    coef = agg.response_coefficients(lengths, mode=mode, max_response_len=24, alpha=alpha)
    aux = agg.response_coefficients(lengths, mode="token-mean", max_response_len=24)
    batch = {**rollout, "coef": coef, "kl_coef": aux, "entropy_coef": aux, "stat_coef": aux}
    n = len(coef)
    batch = jax.tree.map(lambda x: jnp.asarray(x).reshape(microbatches, n // microbatches,
                                                          *x.shape[1:]), batch)  # fmt: skip
    settings = train.LossSettings.from_config(config)
    new_params, _, stats = train.update_step(graphdef, tx, params, tx.init(params), batch, settings)
    return new_params, stats


@pytest.fixture(scope="module")
def rollout(policy_dir):
    rng = np.random.default_rng(0)
    n, p, m = 16, 16, 24
    lengths = rng.integers(2, m + 1, n)
    mask = np.arange(m)[None] < lengths[:, None]
    return {
        "prompt_ids": rng.integers(4, 20, (n, p)).astype(np.int32),
        "prompt_mask": np.ones((n, p), bool),
        "resp_ids": rng.integers(4, 20, (n, m)).astype(np.int32),
        "resp_mask": mask,
        "old_logp": np.where(mask, np.log(rng.uniform(0.05, 0.3, (n, m))), 0).astype(np.float32),
        "advantages": rng.normal(size=n).astype(np.float32),
    }


def test_update_delta_l_alpha0_equals_dr_grpo_and_differs_from_dapo(policy_dir, rollout):
    a, stats_a = one_update(policy_dir, "delta-l", 0.0, rollout)
    b, stats_b = one_update(policy_dir, "seq-mean-token-sum-norm", 1.0, rollout)
    c, _ = one_update(policy_dir, "token-mean", 1.0, rollout)
    np.testing.assert_allclose(stats_a["loss/total"], stats_b["loss/total"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    diff = max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True))  # fmt: skip
    assert diff > 1e-5


def test_update_is_the_same_with_four_microbatches(policy_dir, rollout):
    _, one = one_update(policy_dir, "delta-l", 0.75, rollout, microbatches=1)
    _, four = one_update(policy_dir, "delta-l", 0.75, rollout, microbatches=4)
    np.testing.assert_allclose(four["loss/total"], one["loss/total"], rtol=1e-5)
    np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-4)
