"""launch.tpu and launch.gpu: dry runs print exactly the commands a run would execute, bad
arguments stop before anything runs, and the executor runs steps in order and stops a
multi-host step when one of its processes fails."""

import pathlib
import subprocess
import sys

import pytest

from launch import _common, gpu, tpu

V5E = ["--name=rl-v5e", "--zone=us-west4-a"]
TRAIN = ["deltal-train", "--config=configs/countdown_tiny.py", "--workdir=runs/v5e"]
SSH_V5E = "gcloud compute tpus tpu-vm ssh rl-v5e --zone=us-west4-a --worker=all"
INSTALL_TPU = (
    "mkdir -p deltal_jax && tar -xzf deltal_jax-src.tar.gz -C deltal_jax && cd deltal_jax"
    ' && python3 -m pip install -e ".[tpu]"'
)
RUN_PREFIX = 'cd deltal_jax && export PATH="$HOME/.local/bin:$PATH" && '


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fails the test if anything tries to start a process."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run started a process: {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


def dry_run(module, argv, capsys) -> list[str]:
    """The lines a dry run prints on stdout; asserts it exits with status 0."""
    assert module.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def usage_error(module, argv, capsys) -> str:
    """The message of a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "accelerator, gcloud_type, chips, workers, runtime",
    [
        ("v5e-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
        ("v5e-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
        ("v5e-256", "v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
        ("v6e-16", "v6e-16", 16, 4, "v2-alpha-tpuv6e"),
        ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
        ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
        ("v5p-128", "v5p-128", 64, 16, "v2-alpha-tpuv5"),
        ("v3-32", "v3-32", 16, 4, "tpu-ubuntu2204-base"),
    ],
)
def test_slice_shape_counts_chips_and_workers(accelerator, gcloud_type, chips, workers, runtime):
    shape = tpu.slice_shape(accelerator)
    assert shape == tpu.SliceShape(gcloud_type, chips, workers, runtime)


def test_v5e_16_flow_dry_run_prints_exact_commands(no_subprocess, capsys):
    assert dry_run(tpu, ["create", *V5E, "--accelerator_type=v5e-16", "--dry_run"], capsys) == [
        "gcloud compute tpus tpu-vm create rl-v5e --zone=us-west4-a "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"
    ]
    assert dry_run(tpu, ["install", *V5E, "--dry_run"], capsys) == [
        "git archive --format=tar.gz --output=/tmp/deltal_jax-src.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/deltal_jax-src.tar.gz rl-v5e:deltal_jax-src.tar.gz"
        " --zone=us-west4-a --worker=all",
        f"{SSH_V5E} '--command={INSTALL_TPU}'",
    ]
    # The sweep tool's contract: `run --name --zone [--dry_run] -- COMMAND`.
    assert dry_run(tpu, ["run", *V5E, "--dry_run", "--", *TRAIN], capsys) == [
        f"{SSH_V5E} '--command={RUN_PREFIX}deltal-train --distributed "
        "--config=configs/countdown_tiny.py --workdir=runs/v5e'"
    ]
    assert dry_run(tpu, ["copy", *V5E, "--workdir=runs/v5e", "--dry_run"], capsys) == [
        "mkdir -p runs/rl-v5e",
        "gcloud compute tpus tpu-vm scp rl-v5e:deltal_jax/runs/v5e runs/rl-v5e"
        " --zone=us-west4-a --worker=0 --recurse",
    ]
    assert dry_run(tpu, ["delete", *V5E, "--dry_run"], capsys) == [
        "gcloud compute tpus tpu-vm delete rl-v5e --zone=us-west4-a --quiet"
    ]


def test_tpu_create_reports_workers_on_stderr(no_subprocess, capsys):
    tpu.main(["create", *V5E, "--accelerator_type=v5e-16", "--dry_run"])
    assert "16 chips on 4 worker(s) per slice" in capsys.readouterr().err


def test_tpu_options_reach_every_command(no_subprocess, capsys):
    lines = dry_run(
        tpu,
        [
            "create",
            *V5E,
            "--project=my-proj",
            "--accelerator_type=v4-32",
            "--version=tpu-vm-custom",
            "--spot",
            "--dry_run",
        ],
        capsys,
    )
    assert lines == [
        "gcloud compute tpus tpu-vm create rl-v5e --zone=us-west4-a --project=my-proj "
        "--accelerator-type=v4-32 --version=tpu-vm-custom --spot"
    ]
    argv = ["run", *V5E, "--remote_dir=src/dl", "--env", "A=1 2", "--dry_run", "--"]
    lines = dry_run(tpu, [*argv, "python3", "-m", "deltal_jax.main", "--workdir=w"], capsys)
    # The remote line is one --command argument; its own quoting of 'A=1 2' is escaped.
    assert lines == [
        f'{SSH_V5E} \'--command=cd src/dl && export PATH="$HOME/.local/bin:$PATH" && env '
        "'\"'\"'A=1 2'\"'\"' python3 -m deltal_jax.main --distributed --workdir=w'"
    ]


def test_tpu_install_from_git_checks_out_the_fetched_ref(no_subprocess, capsys):
    repo = "https://github.com/me/deltal_jax.git"
    lines = dry_run(tpu, ["install", *V5E, f"--repo={repo}", "--ref=v1", "--dry_run"], capsys)
    assert lines == [
        f"{SSH_V5E} '--command=test -d deltal_jax/.git || git clone --quiet {repo} deltal_jax"
        " && cd deltal_jax && git fetch --quiet origin v1 && git checkout --quiet --detach "
        'FETCH_HEAD && python3 -m pip install -e ".[tpu]"\''
    ]


def test_multislice_uses_queued_resources_on_all_nodes(no_subprocess, capsys):
    ms = ["--name=ms", "--zone=us-west4-a", "--slices=2", "--dry_run"]
    qr = "gcloud compute tpus queued-resources"
    assert dry_run(tpu, ["create", *ms, "--accelerator_type=v5e-16", "--spot"], capsys) == [
        f"{qr} create ms --zone=us-west4-a --accelerator-type=v5litepod-16 "
        "--runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=ms --spot"
    ]
    assert dry_run(tpu, ["install", *ms], capsys)[1:] == [
        f"{qr} scp /tmp/deltal_jax-src.tar.gz ms:deltal_jax-src.tar.gz --zone=us-west4-a "
        "--node=all --worker=all",
        f"{qr} ssh ms --zone=us-west4-a --node=all --worker=all '--command={INSTALL_TPU}'",
    ]
    assert dry_run(tpu, ["run", *ms, "--", *TRAIN], capsys) == [
        f"{qr} ssh ms --zone=us-west4-a --node=all --worker=all '--command={RUN_PREFIX}"
        "deltal-train --distributed --config=configs/countdown_tiny.py --workdir=runs/v5e'"
    ]
    assert dry_run(tpu, ["copy", *ms, "--workdir=/data/run", "--dest=out"], capsys) == [
        "mkdir -p out",
        f"{qr} scp ms:/data/run out --zone=us-west4-a --node=0 --worker=0 --recurse",
    ]
    assert dry_run(tpu, ["delete", *ms], capsys) == [
        f"{qr} delete ms --zone=us-west4-a --force --quiet"
    ]


def test_other_commands_run_unchanged_on_every_worker(no_subprocess, capsys):
    lines = dry_run(tpu, ["run", *V5E, "--dry_run", "--", "ls", "runs"], capsys)
    assert lines == [f"{SSH_V5E} '--command={RUN_PREFIX}ls runs'"]


def test_four_gpu_host_dry_run_prints_exact_commands(no_subprocess, capsys):
    assert dry_run(gpu, ["install", "--dry_run"], capsys) == ["python3 -m pip install -e '.[cuda]'"]
    argv = ["run", "--gpus=4", "--dry_run", "--", *TRAIN[:2], "--workdir=runs/gpu"]
    assert dry_run(gpu, [*argv, "--config.mesh.fsdp=4"], capsys) == [
        "env CUDA_VISIBLE_DEVICES=0,1,2,3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 deltal-train "
        "--config=configs/countdown_tiny.py --workdir=runs/gpu --config.mesh.fsdp=4"
    ]
    argv = ["run", "--gpus=1,3", "--mem_fraction=0.5", "--env", "NCCL_DEBUG=INFO", "--dry_run"]
    assert dry_run(gpu, [*argv, "--", "nvidia-smi"], capsys) == [
        "env CUDA_VISIBLE_DEVICES=1,3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 NCCL_DEBUG=INFO nvidia-smi"
    ]


def test_multi_host_gpu_gives_each_host_its_process_id(no_subprocess, capsys):
    hosts = ["--hosts=gpu0,me@gpu1", "--dry_run"]
    install = (
        "'mkdir -p deltal_jax && tar -xzf deltal_jax-src.tar.gz -C deltal_jax && cd deltal_jax"
        ' && python3 -m pip install -e ".[cuda]"\''
    )
    assert dry_run(gpu, ["install", *hosts], capsys) == [
        "git archive --format=tar.gz --output=/tmp/deltal_jax-src.tar.gz HEAD",
        "scp -o BatchMode=yes /tmp/deltal_jax-src.tar.gz gpu0:deltal_jax-src.tar.gz",
        "scp -o BatchMode=yes /tmp/deltal_jax-src.tar.gz me@gpu1:deltal_jax-src.tar.gz",
        f"ssh -o BatchMode=yes gpu0 {install}",
        f"ssh -o BatchMode=yes me@gpu1 {install}",
    ]
    lines = dry_run(gpu, ["run", *hosts, "--", *TRAIN], capsys)
    assert lines == [
        f"ssh -o BatchMode=yes {host} '{RUN_PREFIX}env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "
        f"deltal-train --coordinator_address=gpu0:8482 --num_processes=2 --process_id={i} "
        "--config=configs/countdown_tiny.py --workdir=runs/v5e'"
        for i, host in enumerate(["gpu0", "me@gpu1"])
    ]
    explicit = ["--coordinator_address=10.0.0.2:1234", "--", *TRAIN]
    lines = dry_run(gpu, ["run", *hosts, *explicit], capsys)
    assert all("--coordinator_address=10.0.0.2:1234 --num_processes=2" in x for x in lines)


def test_gpu_plan_runs_hosts_together_and_install_in_three_steps():
    """Copy and install overlap across hosts; the archive is made once, before the copies."""
    args = gpu.make_parser().parse_args(["install", "--hosts=a,b,c"])
    plan = gpu._build(args, [])
    assert [len(step) for step in plan] == [1, 3, 3]
    args = gpu.make_parser().parse_args(["run", "--hosts=a,b,c"])
    assert [len(step) for step in gpu._build(args, ["deltal-train"])] == [3]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["create", *V5E, "--accelerator_type=v5e-12"], "v5litepod slices come in sizes"),
        (["create", *V5E, "--accelerator_type=v7-8"], "accepted generations"),
        (["create", *V5E, "--accelerator_type=v5e16"], "not GENERATION-SIZE"),
        (["create", *V5E, "--accelerator_type=v4-12"], "multiples of 8"),
        (["create", *V5E], "--accelerator_type"),
        (["create", "--zone=us-west4-a", "--accelerator_type=v5e-16"], "--name"),
        (["delete", "--name=Bad_Name", "--zone=us-west4-a"], "lowercase letters"),
        (["delete", "--name=rl", "--zone=us-west4"], "not a zone"),
        (["delete", "--name=rl", "--zone=us-west4-a", "--slices=0"], "at least 1"),
        (
            ["create", *V5E, "--slices=2", "--accelerator_type=v5e-16", "--preemptible"],
            "use --spot",
        ),
        (["create", *V5E, "--accelerator_type=v5e-16", "--spot", "--preemptible"], "not allowed"),
        (["run", *V5E], "run needs the command after --"),
        (["delete", *V5E, "--", "ls"], "takes no command"),
        (["run", *V5E, "--", *TRAIN, "--distributed"], "sets --distributed itself"),
        (["run", *V5E, "--env", "NOVALUE", "--", "ls"], "KEY=VALUE"),
        (["install", *V5E, "--ref=main"], "--ref needs --repo"),
        (["copy", *V5E, "--workdir=gs://b/run"], "gcloud storage cp"),
    ],
)
def test_tpu_bad_arguments_are_usage_errors(no_subprocess, capsys, argv, message):
    assert message in usage_error(tpu, [*argv, "--dry_run"], capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--gpus=0", "--", "x"], "give a count"),
        (["run", "--gpus=0,0", "--", "x"], "distinct GPU ids"),
        (["run", "--gpus=four", "--", "x"], "give a count"),
        (["run", "--mem_fraction=1.5", "--", "x"], "(0, 1]"),
        (["run", "--hosts=a,a", "--", "x"], "names a host twice"),
        (["run", "--hosts=a,-oProxyCommand=x", "--", "x"], "not a host name"),
        (["run", "--gpus=2", "--env", "CUDA_VISIBLE_DEVICES=1", "--", "x"], "use --gpus"),
        (["run", "--env", "XLA_PYTHON_CLIENT_MEM_FRACTION=1", "--", "x"], "use --mem_fraction"),
        (["run", "--hosts=a,b", "--coordinator_address=a", "--", *TRAIN], "not HOST:PORT"),
        (["run", "--hosts=a,b", "--", *TRAIN, "--process_id=0"], "sets --process_id itself"),
        (["install", "--repo=https://x/y.git"], "--repo is for --hosts"),
        (["run"], "run needs the command after --"),
    ],
)
def test_gpu_bad_arguments_are_usage_errors(no_subprocess, capsys, argv, message):
    assert message in usage_error(gpu, [*argv, "--dry_run"], capsys)


def test_execute_runs_steps_in_order(tmp_path):
    log = tmp_path / "log"
    append = "import sys; open(sys.argv[1], 'a').write(sys.argv[2])"
    plan = [
        [[sys.executable, "-c", append, str(log), "a"]],
        [[sys.executable, "-c", append, str(log), "b"], [sys.executable, "-c", "pass"]],
        [[sys.executable, "-c", append, str(log), "c"]],
    ]
    assert _common.execute(plan, dry_run=False) == 0
    assert log.read_text() == "abc"


def test_execute_stops_a_step_when_one_process_fails(tmp_path):
    """The failing process's status comes back, its partner (which would write a file after
    a minute) is terminated, and the next step never starts."""
    woke, next_step = tmp_path / "partner-woke", tmp_path / "next-step-ran"
    touch = "import sys, time; time.sleep(float(sys.argv[1])); open(sys.argv[2], 'w')"
    plan = [
        [
            [sys.executable, "-c", touch, "60", str(woke)],
            [sys.executable, "-c", "raise SystemExit(3)"],
        ],
        [[sys.executable, "-c", touch, "0", str(next_step)]],
    ]
    assert _common.execute(plan, dry_run=False, poll_seconds=0.05) == 3
    assert not woke.exists()
    assert not next_step.exists()


def test_module_entry_point_prints_the_dry_run():
    """`python -m launch.tpu ... --dry_run -- ...` from the repository root, as the sweep
    tool calls it."""
    out = subprocess.run(
        [sys.executable, "-m", "launch.tpu", "run", *V5E, "--dry_run", "--", "ls"],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    ).stdout
    assert out == f"{SSH_V5E} '--command={RUN_PREFIX}ls'\n"
