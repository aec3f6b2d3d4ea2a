"""Multi-GPU hosts: install this repository with the CUDA build of JAX and start the
trainer, on this machine or on several hosts over ssh.

One host: one process sees all of the host's GPUs and the config's mesh spreads over them
(`--config.mesh.fsdp=4` shards parameters and optimiser state over 4 GPUs; the data axis,
-1 by default, takes the devices left).

    python -m launch.gpu install
    python -m launch.gpu run --gpus=4 -- deltal-train --config=configs/countdown_tiny.py \\
        --workdir=runs/gpu --config.mesh.fsdp=4

Several hosts (`--hosts=a,b,...`, each reachable as `ssh HOST` without a password prompt):
one process per host, all started at once, each given `--coordinator_address=FIRST:8482
--num_processes=N --process_id=I` so that `jax.distributed.initialize` joins them; the
first host is process 0 and the coordinator. If one process fails the others are
stopped. The repository lives in ~/deltal_jax on each host (`--remote_dir`); `install`
copies the committed tree (`git archive HEAD`) there, or clones `--repo` at `--ref`.
Process 0 writes metrics and curves; checkpoints are written by every process, so a
multi-host run that must resume needs its `--workdir` on a file system all hosts share.

    python -m launch.gpu install --hosts=gpu0,gpu1
    python -m launch.gpu run --hosts=gpu0,gpu1 -- deltal-train --config=... --workdir=...

`--dry_run` prints every command, one per line, and runs nothing.

Environment set for the trainer:
  XLA_PYTHON_CLIENT_MEM_FRACTION  --mem_fraction (default 0.9): share of each GPU's memory
                                  JAX reserves at start (JAX's own default is 0.75); the
                                  rest is left to NCCL, cuDNN and the CUDA context.
  CUDA_VISIBLE_DEVICES            --gpus=4 (GPUs 0-3) or --gpus=0,2; unset: all GPUs.
Others with --env KEY=VALUE, e.g.:
  XLA_PYTHON_CLIENT_PREALLOCATE=false  allocate on demand (a GPU shared with other jobs)
  JAX_COMPILATION_CACHE_DIR=/path      reuse compiled programs across restarts
  NCCL_DEBUG=INFO                      explain a hang or error in collectives
  NCCL_SOCKET_IFNAME=eth0              the network interface between hosts
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from launch import _common
from launch._common import Command, LaunchError, Plan

COORDINATOR_PORT = 8482  # the port JAX's own Cloud TPU cluster detection uses
_SSH_OPTIONS = ["-o", "BatchMode=yes"]  # fail, rather than prompt, when a key is missing
_HOST = re.compile(r"([A-Za-z0-9_.-]+@)?[A-Za-z0-9_.-]+")


def parse_hosts(hosts: str | None) -> list[str]:
    """`a,user@b,c` as a list; [] for None (this machine)."""
    if hosts is None:
        return []
    names = [h.strip() for h in hosts.split(",")]
    for h in names:
        if not _HOST.fullmatch(h) or h.startswith("-"):
            raise LaunchError(
                f"--hosts={hosts!r}: {h!r} is not a host name; give HOST or USER@HOST "
                "separated by commas, e.g. --hosts=gpu0,gpu1."
            )
    if len(set(names)) != len(names):
        raise LaunchError(f"--hosts={hosts!r} names a host twice; one process runs per host.")
    return names


def parse_gpus(gpus: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES for --gpus: a count N (GPUs 0..N-1) or a list of two or more
    GPU ids (a single number is always a count)."""
    if gpus is None:
        return None
    if re.fullmatch(r"[0-9]+", gpus) and int(gpus) > 0:
        return ",".join(str(i) for i in range(int(gpus)))
    ids = gpus.split(",")
    if len(ids) > 1 and all(re.fullmatch(r"[0-9]+", i) for i in ids) and len(set(ids)) == len(ids):
        return gpus
    raise LaunchError(
        f"--gpus={gpus!r}: give a count (--gpus=4: GPUs 0-3) or two or more distinct GPU "
        "ids (--gpus=0,2); for one GPU other than 0, --env CUDA_VISIBLE_DEVICES=ID."
    )


def _env(args: argparse.Namespace) -> list[str]:
    if not 0.0 < args.mem_fraction <= 1.0:
        raise LaunchError(f"--mem_fraction={args.mem_fraction}: need a fraction in (0, 1].")
    visible = parse_gpus(args.gpus)
    env = [f"CUDA_VISIBLE_DEVICES={visible}"] if visible is not None else []
    env.append(f"XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction:g}")
    for item in _common.parse_env(args.env):
        name = item.split("=", 1)[0]
        if any(e.startswith(name + "=") for e in env):
            flag = "--gpus" if name == "CUDA_VISIBLE_DEVICES" else "--mem_fraction"
            raise LaunchError(f"--env {item!r}: {flag} sets {name}; use {flag} alone.")
        env.append(item)
    return env


def _ssh(host: str, script: str) -> Command:
    return ["ssh", *_SSH_OPTIONS, host, script]


def _install(args: argparse.Namespace, command: list[str]) -> Plan:
    hosts = parse_hosts(args.hosts)
    if args.repo is not None and not hosts:
        raise LaunchError("--repo is for --hosts; this machine installs its own checkout.")
    if args.repo is None and args.ref != "HEAD":
        raise LaunchError("--ref needs --repo (without it the local HEAD is copied).")
    if not hosts:
        return [[["python3", "-m", "pip", "install", "-e", ".[cuda]"]]]
    script = _common.install_script("cuda", args.remote_dir, args.repo, args.ref)
    install = [[_ssh(h, script) for h in hosts]]
    if args.repo is not None:
        return install
    copy = [
        ["scp", *_SSH_OPTIONS, _common.LOCAL_ARCHIVE, f"{h}:{_common.REMOTE_ARCHIVE}"]
        for h in hosts
    ]
    return [[_common.archive_command()], copy, *install]


def _run(args: argparse.Namespace, command: list[str]) -> Plan:
    hosts = parse_hosts(args.hosts)
    env = _env(args)
    if not hosts:
        return [[_common.with_env(env, command)]]
    if len(hosts) == 1:
        script = _common.remote_run_script(args.remote_dir, _common.with_env(env, command))
        return [[_ssh(hosts[0], script)]]
    coordinator = args.coordinator_address or f"{hosts[0].split('@')[-1]}:{COORDINATOR_PORT}"
    if not re.fullmatch(r"[^:\s]+:[0-9]+", coordinator):
        raise LaunchError(f"--coordinator_address={coordinator!r} is not HOST:PORT.")
    step = []
    for i, host in enumerate(hosts):
        flags = [
            f"--coordinator_address={coordinator}",
            f"--num_processes={len(hosts)}",
            f"--process_id={i}",
        ]
        trainer = _common.with_trainer_flags(command, flags, "launch.gpu")
        script = _common.remote_run_script(args.remote_dir, _common.with_env(env, trainer))
        step.append(_ssh(host, script))
    return [step]


def _build(args: argparse.Namespace, command: list[str]) -> Plan:
    return {"install": _install, "run": _run}[args.subcommand](args, command)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hosts", default=None, help="a,b,...: ssh hosts (default: here)")
    common.add_argument(
        "--remote_dir", default=_common.DEFAULT_REMOTE_DIR, help="checkout, under ~ on hosts"
    )
    common.add_argument("--dry_run", action="store_true", help="print the commands only")
    sub = parser.add_subparsers(dest="subcommand", required=True)

    install = sub.add_parser("install", parents=[common], help='pip install -e ".[cuda]"')
    install.add_argument("--repo", default=None, help="git URL to clone instead of copying HEAD")
    install.add_argument("--ref", default="HEAD", help="branch, tag or commit of --repo")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run `-- COMMAND` (one process per host)",
        usage="%(prog)s [options] -- COMMAND [ARG ...]",
    )
    run.add_argument("--gpus", default=None, help="count (4) or ids (0,2); default: all")
    run.add_argument("--mem_fraction", type=float, default=0.9, help="of each GPU's memory")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    run.add_argument(
        "--coordinator_address",
        default=None,
        help=f"HOST:PORT of process 0 (default: first host:{COORDINATOR_PORT})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_cli(make_parser(), _build, argv)


if __name__ == "__main__":
    sys.exit(main())
