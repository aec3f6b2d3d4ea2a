"""Cloud TPU VMs: create a slice, install this repository on every worker, run the same
command on every worker, copy the results back, delete the slice.

    python -m launch.tpu create  --name=rl --zone=us-west4-a --accelerator_type=v5e-16
    python -m launch.tpu install --name=rl --zone=us-west4-a
    python -m launch.tpu run     --name=rl --zone=us-west4-a -- \\
        deltal-train --config=configs/countdown_tiny.py --workdir=runs/rl
    python -m launch.tpu copy    --name=rl --zone=us-west4-a --workdir=runs/rl
    python -m launch.tpu delete  --name=rl --zone=us-west4-a

`--dry_run` on any of them prints the gcloud commands, one per line, and runs nothing.

A slice of more than one host (v5e-16 has 4 workers of 4 chips) runs one process per
worker, all started at once by `gcloud ... ssh --worker=all`. The trainer gets
`--distributed`, so each process calls `jax.distributed.initialize()`, which finds the
other workers (and, in a multi-slice run, the other slices) from the TPU VM's metadata:
no per-worker script, no addresses to type.

Multi-slice: `--slices=N` (N > 1) on every subcommand switches to a queued resource of N
slices joined by the data-centre network (`gcloud compute tpus queued-resources`); JAX's
TPU cluster detection reads the slice layout the runtime provides. `create` then returns
once the request is queued; `install` works when `gcloud compute tpus queued-resources
describe NAME --zone=ZONE` reports ACTIVE.

`install` copies the committed tree (`git archive HEAD`) to every worker, or with
`--repo=URL [--ref=REF]` clones it there, then `pip install -e ".[tpu]"`; commands run
from that checkout (~/deltal_jax, `--remote_dir`). Process 0, on worker 0, writes the
metrics, TensorBoard files and curves, so `copy` fetches the work directory from worker 0.
Checkpoints of a multi-host run are written by every process: give the trainer a
`--workdir` on a file system all workers share (a Filestore or gcsfuse mount) if the run
must resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence

from launch import _common
from launch._common import Command, LaunchError, Plan


@dataclasses.dataclass(frozen=True)
class _Generation:
    runtime: str  # default TPU software version (gcloud --version / --runtime-version)
    cores_per_chip: int  # the number in the type counts TensorCores
    single_host_chips: int  # a slice of at most this many chips is one VM
    chips_per_host: int  # in multi-host slices
    chip_counts: tuple[int, ...] | None  # accepted sizes in chips; None: any multiple of 4


# Runtime versions are the ones Google's TPU software-version page gives for JAX.
_GENERATIONS = {
    "v2": _Generation("tpu-ubuntu2204-base", 2, 4, 4, None),
    "v3": _Generation("tpu-ubuntu2204-base", 2, 4, 4, None),
    "v4": _Generation("tpu-ubuntu2204-base", 2, 4, 4, None),
    "v5p": _Generation("v2-alpha-tpuv5", 2, 4, 4, None),
    "v5litepod": _Generation("v2-alpha-tpuv5-lite", 1, 8, 4, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": _Generation("v2-alpha-tpuv6e", 1, 8, 4, (1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {"v5e": "v5litepod"}  # the marketing name of the chip gcloud calls v5litepod
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")


@dataclasses.dataclass(frozen=True)
class SliceShape:
    accelerator_type: str  # as gcloud spells it, e.g. v5litepod-16
    chips: int
    workers: int  # TPU VMs (hosts) in one slice: one trainer process each
    runtime: str  # default software version


def slice_shape(accelerator_type: str) -> SliceShape:
    """Parses GENERATION-SIZE (v5e-16, v5litepod-16, v4-32, v6e-8, ...).

    SIZE counts TensorCores: chips = SIZE / cores_per_chip (2 on v2-v4 and v5p, 1 on v5e and
    v6e). A slice is one VM up to `single_host_chips` chips, else `chips_per_host` chips per
    VM: v5e-16 is 16 chips on 4 workers, v4-32 is 16 chips on 4 workers, v5e-8 one worker.
    """
    accepted = ", ".join([*_GENERATIONS, *(f"{a} (= {g})" for a, g in _ALIASES.items())])
    m = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", accelerator_type)
    if m is None or _ALIASES.get(m[1], m[1]) not in _GENERATIONS:
        raise LaunchError(
            f"--accelerator_type={accelerator_type!r} is not GENERATION-SIZE with a known "
            f"generation; accepted generations: {accepted}; e.g. v5e-16 or v4-32."
        )
    name, size = _ALIASES.get(m[1], m[1]), int(m[2])
    gen = _GENERATIONS[name]
    chips, rest = divmod(size, gen.cores_per_chip)
    if gen.chip_counts is not None:
        valid = chips in gen.chip_counts and rest == 0
        sizes = ", ".join(str(c * gen.cores_per_chip) for c in gen.chip_counts)
    else:
        valid = size > 0 and size % (4 * gen.cores_per_chip) == 0
        sizes = f"multiples of {4 * gen.cores_per_chip}"
    if not valid:
        raise LaunchError(
            f"--accelerator_type={accelerator_type!r}: {name} slices come in sizes {sizes} "
            "(TensorCores)."
        )
    workers = 1 if chips <= gen.single_host_chips else chips // gen.chips_per_host
    return SliceShape(f"{name}-{size}", chips, workers, gen.runtime)


def _check_target(args: argparse.Namespace) -> None:
    if not _NAME.fullmatch(args.name):
        raise LaunchError(
            f"--name={args.name!r}: TPU names are 1-63 lowercase letters, digits and "
            "hyphens, starting with a letter and not ending with a hyphen."
        )
    if not _ZONE.fullmatch(args.zone):
        raise LaunchError(
            f"--zone={args.zone!r} is not a zone such as us-west4-a (a region plus a letter)."
        )
    if args.slices < 1:
        raise LaunchError(f"--slices={args.slices}: need at least 1.")


def _gcloud(
    args: argparse.Namespace, verb: str, *operands: str, flags: Sequence[str] = ()
) -> Command:
    """`gcloud compute tpus tpu-vm VERB OPERANDS --zone=Z [--project=P] FLAGS`, with
    `queued-resources` in place of `tpu-vm` for a multi-slice."""
    group = "tpu-vm" if args.slices == 1 else "queued-resources"
    project = [f"--project={args.project}"] if args.project else []
    where = [f"--zone={args.zone}", *project]
    return ["gcloud", "compute", "tpus", group, verb, *operands, *where, *flags]


def _all_workers(args: argparse.Namespace) -> list[str]:
    return ["--worker=all"] if args.slices == 1 else ["--node=all", "--worker=all"]


def _ssh_all(args: argparse.Namespace, script: str) -> Command:
    return _gcloud(args, "ssh", args.name, flags=[*_all_workers(args), f"--command={script}"])


def _create(args: argparse.Namespace, command: list[str]) -> Plan:
    shape = slice_shape(args.accelerator_type)
    version = args.version or shape.runtime
    if args.slices == 1:
        how = [f"--version={version}"]
    elif args.preemptible:
        raise LaunchError("--preemptible is for single slices; use --spot with --slices.")
    else:
        how = [
            f"--runtime-version={version}",
            f"--node-count={args.slices}",
            f"--node-prefix={args.name}",
        ]
    pricing = ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
    print(
        f"{shape.accelerator_type}: {shape.chips} chips on {shape.workers} worker(s) per "
        f"slice, {args.slices} slice(s), software version {version}",
        file=sys.stderr,
    )
    accelerator = f"--accelerator-type={shape.accelerator_type}"
    return [[_gcloud(args, "create", args.name, flags=[accelerator, *how, *pricing])]]


def _install(args: argparse.Namespace, command: list[str]) -> Plan:
    if args.repo is None and args.ref != "HEAD":
        raise LaunchError("--ref needs --repo (without it the local HEAD is copied).")
    script = _common.install_script("tpu", args.remote_dir, args.repo, args.ref)
    install = [[_ssh_all(args, script)]]
    if args.repo is not None:
        return install
    destination = f"{args.name}:{_common.REMOTE_ARCHIVE}"
    copy = _gcloud(args, "scp", _common.LOCAL_ARCHIVE, destination, flags=_all_workers(args))
    return [[_common.archive_command()], [copy], *install]


def _run(args: argparse.Namespace, command: list[str]) -> Plan:
    env = _common.parse_env(args.env)
    trainer = _common.with_trainer_flags(command, ["--distributed"], "launch.tpu")
    script = _common.remote_run_script(args.remote_dir, _common.with_env(env, trainer))
    return [[_ssh_all(args, script)]]


def _copy(args: argparse.Namespace, command: list[str]) -> Plan:
    if args.workdir.startswith("gs://"):
        raise LaunchError(
            f"--workdir={args.workdir!r}: the trainer writes to local disks; for a gs:// "
            "copy use `gcloud storage cp --recursive` directly."
        )
    remote = args.workdir if args.workdir.startswith("/") else f"{args.remote_dir}/{args.workdir}"
    dest = args.dest or f"runs/{args.name}"
    where = (
        [f"--worker={args.worker}"] if args.slices == 1 else ["--node=0", f"--worker={args.worker}"]
    )
    source = f"{args.name}:{remote.rstrip('/')}"
    scp = _gcloud(args, "scp", source, dest, flags=[*where, "--recurse"])
    return [[["mkdir", "-p", dest]], [scp]]


def _delete(args: argparse.Namespace, command: list[str]) -> Plan:
    if args.slices == 1:
        return [[_gcloud(args, "delete", args.name, flags=["--quiet"])]]
    # --force also deletes the slices the queued resource holds.
    return [[_gcloud(args, "delete", args.name, flags=["--force", "--quiet"])]]


_BUILDERS = {"create": _create, "install": _install, "run": _run, "copy": _copy, "delete": _delete}


def _build(args: argparse.Namespace, command: list[str]) -> Plan:
    _check_target(args)
    return _BUILDERS[args.subcommand](args, command)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU (or queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-west4-a")
    common.add_argument("--project", default=None, help="default: gcloud's configured one")
    common.add_argument("--slices", type=int, default=1, help=">1: multi-slice queued resource")
    common.add_argument("--dry_run", action="store_true", help="print the commands only")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--remote_dir", default=_common.DEFAULT_REMOTE_DIR, help="checkout, under ~ on workers"
    )
    sub = parser.add_subparsers(dest="subcommand", required=True)

    create = sub.add_parser("create", parents=[common], help="create the slice(s)")
    create.add_argument("--accelerator_type", required=True, help="e.g. v5e-16, v4-32, v6e-8")
    create.add_argument("--version", default=None, help="TPU software version (default: per type)")
    kind = create.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot VMs (preemptible, cheaper)")
    kind.add_argument("--preemptible", action="store_true", help="legacy preemptible VMs")

    install = sub.add_parser("install", parents=[common, remote], help="install on all workers")
    install.add_argument("--repo", default=None, help="git URL to clone instead of copying HEAD")
    install.add_argument("--ref", default="HEAD", help="branch, tag or commit of --repo")

    run = sub.add_parser(
        "run",
        parents=[common, remote],
        help="run `-- COMMAND` on all workers",
        usage="%(prog)s --name=NAME --zone=ZONE [options] -- COMMAND [ARG ...]",
    )
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable")

    copy = sub.add_parser("copy", parents=[common, remote], help="copy a work directory back")
    copy.add_argument("--workdir", required=True, help="as given to the trainer")
    copy.add_argument("--dest", default=None, help="local directory (default: runs/NAME)")
    copy.add_argument("--worker", type=int, default=0, help="worker to copy from")

    sub.add_parser("delete", parents=[common], help="delete the slice(s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_cli(make_parser(), _build, argv)


if __name__ == "__main__":
    sys.exit(main())
