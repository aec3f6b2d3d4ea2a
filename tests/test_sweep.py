"""Sweeps: expansion and naming, override validation, the runner's resume logic (with a
fake trainer, no JAX training), --emit/--wrap output, and the summary's numbers."""

import csv
import json
import math
import os
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from deltal_jax import sweeps
from launch import sweep as runner

SMOKE = "configs/countdown_tiny.py:smoke"

# Stands in for the trainer: logs each call, resumes after the last logged step and
# writes one eval record per step up to --config.total_steps. FAKE_BEHAVIOUR maps a
# trial name to "fail" (exit 1 after step 1) or "preempt" (exit 0 after step 1).
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir, total = args["workdir"], int(args["config.total_steps"])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "calls"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    behaviour = json.loads(os.environ.get("FAKE_BEHAVIOUR", "{}"))
    name = os.path.basename(workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    start = 0
    if os.path.exists(path):
        start = max(json.loads(line)["step"] for line in open(path)) + 1
    stop = 1 if name in behaviour else total
    print("fake trainer", name, "steps", start, "to", stop)
    with open(path, "a") as f:
        for step in range(start, stop + 1):
            f.write(json.dumps({"step": step, "eval/accuracy": step / total,
                                "eval/pass@2": 1.0, "eval/response_length": 10.0}) + "\\n")
    sys.exit(1 if behaviour.get(name) == "fail" else 0)
    """
)


def _sweep_dict(**changes):
    spec = {
        "config": SMOKE,
        "overrides": {"total_steps": 3},
        "arms": {
            "dapo": {"loss.aggregation": "token-mean"},
            "dl_a0.5": {"loss.aggregation": "delta-l", "loss.alpha": 0.5},
        },
        "grid": {"seed": [0, 1]},
    }
    spec.update(changes)
    return spec


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_sweep(path, spec):
    path.write_text(f"def get_sweep():\n    return {spec!r}\n")
    return str(path)


# --- Expansion and naming ---------------------------------------------------------------


def test_expansion_is_arms_times_grid_with_readable_names_and_merged_overrides():
    spec = {
        "config": "unused.py:x",
        "overrides": {"total_steps": 5},
        "arms": {
            "grpo": {"loss.aggregation": "seq-mean-token-mean"},
            "dl_a0.75": {"loss.aggregation": "delta-l", "loss.alpha": 0.75},
        },
        "grid": {"rollout.max_response_len": [16, 24], "seed": [0, 1]},
    }
    trials = sweeps.expand(sweeps.from_dict(spec, "toy"), "runs/x")
    assert [t.name for t in trials] == [
        "grpo-M16-s0", "grpo-M16-s1", "grpo-M24-s0", "grpo-M24-s1",
        "dl_a0.75-M16-s0", "dl_a0.75-M16-s1", "dl_a0.75-M24-s0", "dl_a0.75-M24-s1",
    ]  # fmt: skip
    assert [t.index for t in trials] == list(range(8))
    t = trials[5]
    assert t.workdir == os.path.join("runs/x", "toy", "dl_a0.75-M16-s1")
    assert (t.arm, t.grid) == ("dl_a0.75", {"rollout.max_response_len": 16, "seed": 1})
    # Sweep overrides first, then the arm, then the grid: the order of the command line.
    assert list(t.overrides.items()) == [
        ("total_steps", 5), ("loss.aggregation", "delta-l"), ("loss.alpha", 0.75),
        ("rollout.max_response_len", 16), ("seed", 1),
    ]  # fmt: skip


def test_fields_without_a_label_are_named_by_their_last_component():
    spec = {
        "config": "unused.py",
        "arms": {"a": {}},
        "grid": {"rollout.temperature": [0.7], "optim.learning_rate": [1e-05],
                 "data.num_numbers": [(3, 4)]},
    }  # fmt: skip
    (trial,) = sweeps.expand(sweeps.from_dict(spec, "x"), "r")
    assert trial.name == "a-temperature0.7-lr1e-05-num_numbers3_4"


def test_select_matches_names_by_glob():
    trials = sweeps.expand(sweeps.from_dict(_sweep_dict(), "t"), "r")
    assert [t.name for t in sweeps.select(trials, "dl_*")] == ["dl_a0.5-s0", "dl_a0.5-s1"]
    assert [t.name for t in sweeps.select(trials, "*-s1")] == ["dapo-s1", "dl_a0.5-s1"]
    with pytest.raises(sweeps.SweepError, match="no trial name matches 'grpo'.*dapo-s0"):
        sweeps.select(trials, "grpo")


def test_paper_toy_sweep_is_six_arms_two_lengths_three_seeds():
    sweep = sweeps.load_sweep("configs/sweeps/paper_toy.py")
    trials = sweeps.expand(sweep, "runs/sweeps")
    assert (sweep.name, sweep.config, len(trials)) == (
        "paper_toy",
        "configs/countdown_tiny.py:toy",
        36,
    )
    assert list(sweep.arms) == ["grpo", "dapo", "dr_grpo", "dl_a0.5", "dl_a0.75", "dl_a1.0"]
    expected = {
        "grpo": "seq-mean-token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
    }  # fmt: skip
    for arm, overrides in sweep.arms.items():
        if arm in expected:
            assert overrides == {"loss.aggregation": expected[arm]}
        else:
            assert overrides == {"loss.aggregation": "delta-l", "loss.alpha": float(arm[4:])}
    assert "dl_a0.75-M24-s1" in {t.name for t in trials}
    assert {(t.grid["rollout.max_response_len"], t.grid["seed"]) for t in trials} == {
        (m, s) for m in (24, 32) for s in (0, 1, 2)
    }


def test_smoke_sweep_resolves_to_valid_configs():
    sweep = sweeps.load_sweep("configs/sweeps/smoke.py")
    trials = sweeps.expand(sweep, "runs/sweeps")
    configs = sweeps.resolve(sweep, trials)
    got = [
        (t.name, c.loss.aggregation, c.loss.alpha, c.seed)
        for t, c in zip(trials, configs, strict=True)
    ]
    assert got == [
        ("dapo-s0", "token-mean", 1.0, 0), ("dapo-s1", "token-mean", 1.0, 1),
        ("dl_a0.5-s0", "delta-l", 0.5, 0), ("dl_a0.5-s1", "delta-l", 0.5, 1),
    ]  # fmt: skip
    assert all(c.total_steps == 2 for c in configs)  # the smoke preset is kept


# --- Validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arms": {"a": {"loss.agregation": "token-mean"}}},
         r"trial a-s0: unknown config field 'loss.agregation'; fields of loss: .*aggregation, "),
        ({"arms": {"a": {"los.alpha": 0.5}}},
         r"unknown config field 'los.alpha'; fields of the top level: .*loss"),
        ({"arms": {"a": {"loss": 0.5}}}, r"'loss' is a group, not a field; accepted: .*loss.alpha"),
        ({"arms": {"a": {"seed.x": 1}}}, r"unknown config field 'seed.x'; fields of seed: \(none"),
        ({"overrides": {"total_steps": "ten"}},
         r"total_steps='ten' has type str; the field holds int \(default 2\)"),
        ({"arms": {"a": {"loss.aggregation": "delta-l", "loss.alpha": 1.5}}},
         r"trial a-s0: config.loss: delta-l alpha must be in \[0, 1\], got 1.5"),
        ({"config": "configs/countdown_tiny.py:nope"},
         r"config 'configs/countdown_tiny.py:nope': Unknown preset 'nope'.*default, smoke"),
        ({"config": "configs/missing.py"}, r"config file 'configs/missing.py' not found"),
    ],
)  # fmt: skip
def test_bad_overrides_fail_at_expansion_naming_the_field(changes, message):
    sweep = sweeps.from_dict(_sweep_dict(**changes), "t")
    with pytest.raises(sweeps.SweepError, match=message):
        sweeps.resolve(sweep, sweeps.expand(sweep, "r"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arms": {"a": {"seed": 3}}}, r"field 'seed' is set both by arm 'a' and in 'grid'"),
        ({"arms": {"a": {"total_steps": 1}}}, r"'total_steps' is set both by arm 'a' and in 'ov"),
        ({"overrides": {"seed": 1}}, r"field 'seed' is in both 'grid' and 'overrides'"),
        ({"grid": {"rollout.temperature": [1.0], "eval.temperature": [1.0]}},
         r"'rollout.temperature' and 'eval.temperature' share the name label 'temperature'"),
        ({"grid": {"seed": [0, 0]}}, r"two trials are named 'dapo-s0'"),
        ({"grid": {"data.data_dir": ["/a b"]}}, r"trial name 'dapo-data_dir/a b' has characters"),
        ({"grid": {"seed": []}}, r"grid field 'seed' needs a non-empty list"),
        ({"arms": {"a/b": {}}}, r"arm name 'a/b' must be non-empty"),
        ({"arms": {}}, r"'arms' must be a non-empty dict"),
        ({"grids": {}}, r"unknown keys \['grids'\]"),
        ({"config": None}, r"'config' must be a string"),
    ],
)  # fmt: skip
def test_malformed_sweeps_are_rejected(changes, message):
    with pytest.raises(sweeps.SweepError, match=message):
        sweeps.expand(sweeps.from_dict(_sweep_dict(**changes), "t"), "r")


def test_trial_command_reads_back_through_the_trainer_flags_as_the_resolved_config():
    spec = _sweep_dict(
        overrides={"total_steps": 3, "optim.learning_rate": 1e-05, "data.num_numbers": (3, 4)},
        arms={"a": {"loss.aggregation": "delta-l", "loss.alpha": 0.75,
                    "rollout.dynamic_sampling": True, "data.data_dir": "/tmp/x y"}},
    )  # fmt: skip
    sweep = sweeps.from_dict(spec, "t")
    trials = sweeps.expand(sweep, "r")
    for trial, config in zip(trials, sweeps.resolve(sweep, trials), strict=True):
        argv = sweeps.command(trial, sweep.config, ["deltal-train"])
        assert argv[:3] == ["deltal-train", f"--config={SMOKE}", f"--workdir={trial.workdir}"]
        flag_values = flags.FlagValues()
        parsed = config_flags.DEFINE_config_file(
            "config", None, "", flag_values=flag_values, sys_argv=argv
        )
        workdir = flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
        flag_values(argv)  # argv[0] is taken as the program name
        assert workdir.value == trial.workdir
        assert parsed.value.to_dict() == config.to_dict()
        assert config.data.num_numbers == (3, 4) and config.optim.learning_rate == 1e-05


# --- Runner ---------------------------------------------------------------------------------


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    return f"{sys.executable} {script}"


def _calls(workdir):
    path = os.path.join(workdir, "calls")
    return len(_read(path).splitlines()) if os.path.exists(path) else 0


def test_resume_reruns_only_unfinished_trials(tmp_path, fake, monkeypatch, capsys):
    sweep_file = _write_sweep(tmp_path / "t.py", _sweep_dict())
    root = str(tmp_path / "runs")
    names = ["dapo-s0", "dapo-s1", "dl_a0.5-s0", "dl_a0.5-s1"]
    dirs = {name: os.path.join(root, "t", name) for name in names}

    monkeypatch.setenv("FAKE_BEHAVIOUR", json.dumps({"dapo-s1": "fail", "dl_a0.5-s0": "preempt"}))
    assert runner.run_sweep(sweep_file, root=root, trainer=fake, parallel=2) == 1
    out = capsys.readouterr().out
    assert "FAILED  dapo-s1  exit status 1" in out
    assert "STOPPED dl_a0.5-s0  exit status 0 at step 1 of 3" in out
    assert "2 trial(s) did not finish: dapo-s1, dl_a0.5-s0" in out
    assert {n: runner.is_done(d) for n, d in dirs.items()} == {
        "dapo-s0": True, "dapo-s1": False, "dl_a0.5-s0": False, "dl_a0.5-s1": True,
    }  # fmt: skip
    assert "fake trainer dapo-s1 steps 0 to 1" in _read(os.path.join(dirs["dapo-s1"], "log.txt"))
    with open(os.path.join(dirs["dl_a0.5-s1"], "trial.json")) as f:
        record = json.load(f)
    assert (record["name"], record["aggregation"], record["alpha"], record["total_steps"]) == (
        "dl_a0.5-s1", "delta-l", 0.5, 3,
    )  # fmt: skip

    monkeypatch.setenv("FAKE_BEHAVIOUR", "{}")
    assert runner.run_sweep(sweep_file, root=root, trainer=fake) == 0
    assert {n: _calls(d) for n, d in dirs.items()} == {
        "dapo-s0": 1, "dapo-s1": 2, "dl_a0.5-s0": 2, "dl_a0.5-s1": 1,
    }  # fmt: skip
    # The re-run got the same command, and the fake trainer resumed after step 1.
    calls = _read(os.path.join(dirs["dapo-s1"], "calls")).splitlines()
    assert calls[0] == calls[1]
    assert "steps 2 to 3" in _read(os.path.join(dirs["dapo-s1"], "log.txt"))
    assert all(runner.is_done(d) for d in dirs.values())

    assert runner.run_sweep(sweep_file, root=root, trainer=fake) == 0
    assert [_calls(d) for d in dirs.values()] == [1, 2, 2, 1]
    assert "0 of 4 trials to run" in capsys.readouterr().out

    # The summary written after the run equals the one rebuilt from the sweep file.
    sweep_dir = os.path.join(root, "t")
    written = _read(os.path.join(sweep_dir, "summary.csv"))
    assert runner.summary(sweep_file, root) == 0
    assert _read(os.path.join(sweep_dir, "summary.csv")) == written
    rows = _rows(os.path.join(sweep_dir, "summary.csv"))
    assert [(r["group"], r["n"], float(r["final_accuracy_mean"])) for r in rows] == [
        ("dapo", "2", 1.0), ("dl_a0.5", "2", 1.0),
    ]  # fmt: skip


def test_only_runs_the_matching_trials(tmp_path, fake):
    sweep_file = _write_sweep(tmp_path / "t.py", _sweep_dict())
    root = str(tmp_path / "runs")
    assert (
        runner.main(["run", sweep_file, "--root", root, "--trainer", fake, "--only", "*-s1"]) == 0
    )
    assert sorted(os.listdir(os.path.join(root, "t"))) == [
        "accuracy_vs_alpha.png", "curves.png", "dapo-s1", "dl_a0.5-s1", "summary.csv",
        "summary.md", "trials.csv",
    ]  # fmt: skip


def test_a_changed_trial_definition_is_refused(tmp_path, fake, capsys):
    sweep_file = _write_sweep(tmp_path / "t.py", _sweep_dict())
    root = str(tmp_path / "runs")
    assert runner.run_sweep(sweep_file, root=root, trainer=fake, only="dapo-s0") == 0
    _write_sweep(tmp_path / "t.py", _sweep_dict(overrides={"total_steps": 4}))
    assert runner.main(["run", sweep_file, "--root", root, "--trainer", fake]) == 2
    err = capsys.readouterr().err
    assert "dapo-s0 holds a run with overrides {'total_steps': 3, " in err
    assert "the sweep now gives {'total_steps': 4, " in err
    assert _calls(os.path.join(root, "t", "dapo-s0")) == 1
    assert not os.path.exists(os.path.join(root, "t", "dapo-s1"))


def test_emit_prints_one_quoted_wrapped_command_per_unfinished_trial(tmp_path, capsys):
    sweep_file = _write_sweep(tmp_path / "t.py", _sweep_dict())
    root = str(tmp_path / "my runs")
    os.makedirs(os.path.join(root, "t", "dapo-s1"))
    open(os.path.join(root, "t", "dapo-s1", runner.DONE), "w").close()
    wrap = "python -m launch.tpu run --name=v5e --zone=us-west4-a --"
    assert runner.main(["run", sweep_file, "--root", root, "--emit", "--wrap", wrap]) == 0
    prefix = f"{wrap} python -m deltal_jax.main --config={SMOKE}"
    assert capsys.readouterr().out.splitlines() == [
        f"{prefix} '--workdir={root}/t/dapo-s0' --config.total_steps=3 "
        "--config.loss.aggregation=token-mean --config.seed=0",
        f"{prefix} '--workdir={root}/t/dl_a0.5-s0' --config.total_steps=3 "
        "--config.loss.aggregation=delta-l --config.loss.alpha=0.5 --config.seed=0",
        f"{prefix} '--workdir={root}/t/dl_a0.5-s1' --config.total_steps=3 "
        "--config.loss.aggregation=delta-l --config.loss.alpha=0.5 --config.seed=1",
    ]


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    sweep_file = _write_sweep(tmp_path / "t.py", _sweep_dict())
    root = str(tmp_path / "runs")
    half = os.path.join(root, "t", "dl_a0.5-s0")
    os.makedirs(half)
    with open(os.path.join(half, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0}) + "\n" + json.dumps({"step": 1}) + "\n")
    assert runner.main(["run", sweep_file, "--root", root, "--dry_run", "--trainer", "T"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Sweep t: 4 trials, 0 finished, 4 to run, 1 at a time."
    assert lines[5] == "  dl_a0.5-s0: resume (logged step 1 of 3)"
    assert lines[6] == (
        f"    T --config={SMOKE} --workdir={half} --config.total_steps=3 "
        "--config.loss.aggregation=delta-l --config.loss.alpha=0.5 --config.seed=0"
    )
    assert os.listdir(os.path.join(root, "t")) == ["dl_a0.5-s0"]
    assert os.listdir(half) == ["metrics.jsonl"]


# --- Scores and summary ------------------------------------------------------------------------


def test_kendall_tau_counts_concordant_discordant_and_tied_pairs():
    # Pairs of y = [1, 3, 2, 2]: (1,3) (1,2) (1,2) concordant; (3,2) (3,2) discordant; one tie.
    assert sweeps.kendall_tau([1, 2, 3, 4], [1, 3, 2, 2]) == pytest.approx(1 / math.sqrt(6 * 5))
    assert sweeps.kendall_tau([0, 10, 20], [0.1, 0.2, 0.9]) == 1.0
    assert sweeps.kendall_tau([0, 10, 20], [0.9, 0.2, 0.1]) == -1.0
    assert sweeps.kendall_tau([0, 10, 20], [0.5, 0.5, 0.5]) == 0.0
    assert sweeps.kendall_tau([0], [0.5]) == 0.0
    ys = [0.2, 0.5, 0.5, 0.1, 0.7, 0.7, 0.3]
    x = list(range(7))
    assert sweeps.kendall_tau(x, ys) == pytest.approx(-sweeps.kendall_tau(x, [-y for y in ys]))


def test_kendall_tau_matches_scipy_tau_b():
    stats = pytest.importorskip("scipy.stats")
    x = [0, 1, 2, 3, 4, 5, 6, 7]
    y = [0.25, 0.5, 0.5, 0.25, 0.75, 0.5, 0.75, 0.75]
    assert sweeps.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_max_drop_is_the_largest_fall_below_the_running_maximum():
    assert sweeps.max_drop([0.2, 0.6, 0.3, 0.5, 0.1, 0.7]) == pytest.approx(0.5)
    assert sweeps.max_drop([0.1, 0.2, 0.2, 0.9]) == 0.0
    assert sweeps.max_drop([0.9, 0.1]) == pytest.approx(0.8)


def _trial(sweep_dir, index, name, arm, aggregation, alpha, seed, metrics, total_steps=4):
    workdir = os.path.join(sweep_dir, name)
    os.makedirs(workdir)
    record = {
        "sweep": "fake", "index": index, "name": name, "arm": arm, "config": "c.py",
        "grid": {"rollout.max_response_len": 16, "seed": seed}, "overrides": {},
        "command": [], "workdir": "elsewhere", "total_steps": total_steps,
        "aggregation": aggregation, "alpha": alpha, "max_response_len": 16, "seed": seed,
        "eval_num_samples": 2,
    }  # fmt: skip
    with open(os.path.join(workdir, "trial.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step, acc, pas, length in metrics:
            f.write(json.dumps({"step": step, "reward/mean": 0.1}) + "\n")  # a train record
            if acc is not None:
                ev = {"eval/accuracy": acc, "eval/pass@2": pas, "eval/response_length": length}
                f.write(json.dumps({"step": step, **ev}) + "\n")


def test_summary_of_fake_trials_is_exact(tmp_path):
    d = str(tmp_path / "fake")
    _trial(
        d,
        0,
        "grpo-M16-s0",
        "grpo",
        "seq-mean-token-mean",
        1.0,
        0,
        [(0, 0.25, 0.5, 10.0), (2, 0.5, 0.75, 11.0), (4, 0.75, 1.0, 12.0)],
    )
    _trial(
        d,
        1,
        "grpo-M16-s1",
        "grpo",
        "seq-mean-token-mean",
        1.0,
        1,
        [(0, 0.25, 0.5, 10.0), (1, None, None, None), (2, 0.75, 1.0, 9.0), (4, 0.5, 0.75, 8.0)],
    )
    _trial(
        d,
        2,
        "dl_a0.5-M16-s0",
        "dl_a0.5",
        "delta-l",
        0.5,
        0,
        [(0, 0.5, 0.5, 10.0), (2, 0.5, 0.75, 12.0), (4, 1.0, 1.0, 14.0)],
    )
    # Resumed from step 1: step 2 is logged twice and its later value counts.
    _trial(
        d,
        3,
        "dl_a0.5-M16-s1",
        "dl_a0.5",
        "delta-l",
        0.5,
        1,
        [(0, 0.5, 0.5, 10.0), (2, 0.25, 0.25, 10.0), (2, 0.5, 0.75, 11.0), (4, 0.75, 1.0, 13.0)],
    )
    # Incomplete (last eval at step 2 of 4): listed, not averaged.
    _trial(d, 4, "dl_a0.5-M16-s2", "dl_a0.5", "delta-l", 0.5, 2,
           [(0, 0.5, 0.5, 10.0), (2, 0.0, 0.0, 10.0)])  # fmt: skip
    with open(os.path.join(d, "dl_a0.5-M16-s2", "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "eval/accura')  # killed mid-write: left out
    result = sweeps.summarize(sweeps.read_records(d), d)

    tau_rise = 1.0  # 0.25 < 0.5 < 0.75
    tau_peak = (2 - 1) / math.sqrt(3 * 3)  # 0.25, 0.75, 0.5: C = 2, D = 1
    tau_tie = (2 - 0) / math.sqrt(3 * (3 - 1))  # 0.5, 0.5, x > 0.5: C = 2, one tie
    trials = _rows(os.path.join(d, "trials.csv"))
    assert [
        (t["trial"], t["status"], t["alpha"], t["M"], t["seed"], t["last_step"], t["best_step"])
        for t in trials
    ] == [
        ("grpo-M16-s0", "complete", "", "16", "0", "4", "4"),
        ("grpo-M16-s1", "complete", "", "16", "1", "4", "2"),
        ("dl_a0.5-M16-s0", "complete", "0.5", "16", "0", "4", "4"),
        ("dl_a0.5-M16-s1", "complete", "0.5", "16", "1", "4", "4"),
        ("dl_a0.5-M16-s2", "incomplete", "0.5", "16", "2", "2", "0"),
    ]
    # final_accuracy, final_pass, best_accuracy, monotonicity, max_drop, final_response_length
    scores = [[float(t[m]) for m in sweeps.METRICS] for t in trials]
    assert scores == [
        pytest.approx([0.75, 1.0, 0.75, tau_rise, 0.0, 12.0], abs=1e-12),
        pytest.approx([0.5, 0.75, 0.75, tau_peak, 0.25, 8.0], abs=1e-12),
        pytest.approx([1.0, 1.0, 1.0, tau_tie, 0.0, 14.0], abs=1e-12),
        pytest.approx([0.75, 1.0, 0.75, tau_tie, 0.0, 13.0], abs=1e-12),
        pytest.approx([0.0, 0.0, 0.5, -1.0, 0.5, 10.0], abs=1e-12),  # 0.5 then 0.0
    ]

    def sample_std(a, b):  # ddof = 1 over two values: |a − b| / √2
        return abs(a - b) / math.sqrt(2)

    groups = _rows(os.path.join(d, "summary.csv"))
    assert [(g["group"], g["arm"], g["alpha"], g["M"], g["n"], g["trials"]) for g in groups] == [
        ("grpo-M16", "grpo", "", "16", "2", "grpo-M16-s0 grpo-M16-s1"),
        ("dl_a0.5-M16", "dl_a0.5", "0.5", "16", "2", "dl_a0.5-M16-s0 dl_a0.5-M16-s1"),
    ]
    expected = {
        "grpo-M16": {"final_accuracy": (0.75, 0.5), "final_pass": (1.0, 0.75),
                     "best_accuracy": (0.75, 0.75), "monotonicity": (tau_rise, tau_peak),
                     "max_drop": (0.0, 0.25), "final_response_length": (12.0, 8.0)},
        "dl_a0.5-M16": {"final_accuracy": (1.0, 0.75), "final_pass": (1.0, 1.0),
                        "best_accuracy": (1.0, 0.75), "monotonicity": (tau_tie, tau_tie),
                        "max_drop": (0.0, 0.0), "final_response_length": (14.0, 13.0)},
    }  # fmt: skip
    for g in groups:
        for metric, (a, b) in expected[g["group"]].items():
            assert float(g[f"{metric}_mean"]) == pytest.approx((a + b) / 2, abs=1e-12), metric
            assert float(g[f"{metric}_std"]) == pytest.approx(sample_std(a, b), abs=1e-12), metric
    assert result["groups"][0]["final_accuracy_std"] == pytest.approx(0.125 * math.sqrt(2))

    markdown = _read(os.path.join(d, "summary.md"))
    assert (
        "| arm | α | M | n | Avg@k | Pass@k | best Avg@k | monotonicity τ | max drop |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| grpo | – | 16 | 2 | 0.625 ± 0.177 | 0.875 ± 0.177 | 0.750 ± 0.000 | 0.667 ± 0.471 "
        "| 0.125 ± 0.177 |\n"
        "| dl_a0.5 | 0.5 | 16 | 2 | 0.875 ± 0.177 | 1.000 ± 0.000 | 0.875 ± 0.177 "
        "| 0.816 ± 0.000 | 0.000 ± 0.000 |\n"
    ) in markdown
    assert (
        "| dl_a0.5-M16-s2 | incomplete | 2 | 0.000 | 0.000 | 0.500 | -1.000 | 0.500 |" in markdown
    )
    for png in ("accuracy_vs_alpha.png", "curves.png"):
        assert _read(os.path.join(d, png), "rb")[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_seed_groups_have_no_std(tmp_path):
    d = str(tmp_path / "fake")
    _trial(d, 0, "grpo-M16-s0", "grpo", "seq-mean-token-mean", 1.0, 0,
           [(0, 0.25, 0.5, 10.0), (4, 0.75, 1.0, 12.0)])  # fmt: skip
    (group,) = sweeps.summarize(sweeps.read_records(d), d)["groups"]
    assert group["n"] == 1 and group["final_accuracy_mean"] == 0.75
    assert math.isnan(group["final_accuracy_std"])
    row = _rows(os.path.join(d, "summary.csv"))[0]
    assert row["final_accuracy_std"] == ""
    assert "| grpo | – | 16 | 1 | 0.750 | 1.000 | 0.750 | 1.000 | 0.000 |" in _read(
        os.path.join(d, "summary.md")
    )
