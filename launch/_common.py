"""What the Cloud TPU and GPU launchers share: plans, dry runs, execution, and the shell
snippets that install this repository on a remote machine and start the trainer there.

A launcher turns its arguments into a *plan*: a list of steps, each a list of commands
(argv lists) that run at the same time; a step starts once every command of the previous
one has exited with status 0. `--dry_run` prints every command of the plan on its own
line with `shlex.join` and runs nothing, so what is printed is exactly what would run and
can be pasted into a shell.

The command to run on the machines is everything after the first `--` on the launcher's
command line. When it is the trainer (`deltal-train ...` or `python3 -m deltal_jax.main
...`) the launcher inserts its distributed flags right after the program name.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

Command = list[str]
Step = list[Command]  # commands that run at the same time
Plan = list[Step]

# Where the source archive goes: a fixed path so that dry runs print the same lines on
# every machine.
LOCAL_ARCHIVE = "/tmp/deltal_jax-src.tar.gz"
REMOTE_ARCHIVE = "deltal_jax-src.tar.gz"  # in the remote home directory
DEFAULT_REMOTE_DIR = "deltal_jax"  # relative to the remote home directory
# pip installs console scripts into ~/.local/bin for a non-root user, which a
# non-interactive ssh shell does not put on PATH.
_REMOTE_PATH = 'export PATH="$HOME/.local/bin:$PATH"'
_PYTHON = re.compile(r"python[0-9.]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """A bad launcher argument, reported before any command runs."""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, command to run): argv split at its first `--`."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def parse_env(items: Sequence[str]) -> list[str]:
    """Checks `--env KEY=VALUE` items; returns them unchanged, in order."""
    for item in items:
        name, sep, _ = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise LaunchError(
                f"--env {item!r} is not KEY=VALUE with KEY a shell variable name "
                "(letters, digits, _), e.g. --env XLA_FLAGS=--xla_dump_to=/tmp/dump."
            )
    return list(items)


def with_env(env: Sequence[str], command: Sequence[str]) -> Command:
    """`env K=V ... command`, or the command alone when there is no variable to set."""
    return ["env", *env, *command] if env else list(command)


def _trainer_program_len(command: Sequence[str]) -> int:
    """How many leading words of `command` name the trainer; 0 when it is not the trainer."""
    if command and os.path.basename(command[0]) == "deltal-train":
        return 1
    python = len(command) >= 3 and _PYTHON.fullmatch(os.path.basename(command[0]))
    return 3 if python and list(command[1:3]) == ["-m", "deltal_jax.main"] else 0


def with_trainer_flags(command: Sequence[str], flags: Sequence[str], launcher: str) -> Command:
    """The trainer command with `flags` inserted after the program name.

    Any other command (`nvidia-smi`, `ls runs`) comes back unchanged: the launcher can run
    arbitrary commands on every machine. A flag the launcher sets must not be given by
    hand, since two values would disagree.
    """
    n = _trainer_program_len(command)
    if n == 0:
        return list(command)
    for flag in flags:
        name = flag.split("=", 1)[0]
        if any(arg == name or arg.startswith(name + "=") for arg in command[n:]):
            raise LaunchError(f"{launcher} sets {name} itself; remove it from the command.")
    return [*command[:n], *flags, *command[n:]]


def archive_command(archive: str = LOCAL_ARCHIVE) -> Command:
    """Packs the committed tree (HEAD) of the repository in the working directory.

    Only committed files travel: a remote install is then a known commit, and neither run
    outputs nor virtual environments are copied. Commit before installing.
    """
    return ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"]


def install_script(extra: str, remote_dir: str, repo: str | None, ref: str) -> str:
    """Shell line that puts the repository in ~/`remote_dir` and installs it editable with
    the `extra` (tpu, cuda).

    Without `repo` it unpacks the archive copied to ~/REMOTE_ARCHIVE. With `repo` it clones
    once, then fetches `ref` (branch, tag or commit; HEAD is the remote's default branch)
    and checks it out detached, so running it again moves every machine to the same commit.
    """
    d = shlex.quote(remote_dir)
    pip = f'python3 -m pip install -e ".[{extra}]"'
    if repo is None:
        return f"mkdir -p {d} && tar -xzf {REMOTE_ARCHIVE} -C {d} && cd {d} && {pip}"
    # `a || b && c` is `(a || b) && c` in sh: clone only when there is no checkout yet.
    return (
        f"test -d {d}/.git || git clone --quiet {shlex.quote(repo)} {d}"
        f" && cd {d} && git fetch --quiet origin {shlex.quote(ref)}"
        f" && git checkout --quiet --detach FETCH_HEAD && {pip}"
    )


def remote_run_script(remote_dir: str, command: Sequence[str]) -> str:
    """Shell line that runs `command` from ~/`remote_dir` with pip's script directory on
    PATH."""
    return f"cd {shlex.quote(remote_dir)} && {_REMOTE_PATH} && {shlex.join(command)}"


def check_command_for(subcommand: str, command: Sequence[str]) -> None:
    """Only `run` takes a command after `--`; it needs one."""
    if subcommand == "run" and not command:
        raise LaunchError(
            "run needs the command after --, e.g. "
            "run ... -- deltal-train --config=configs/countdown_tiny.py --workdir=runs/x"
        )
    if subcommand != "run" and command:
        raise LaunchError(f"{subcommand} takes no command after --; only run does.")


def execute(plan: Plan, dry_run: bool, poll_seconds: float = 0.2) -> int:
    """Runs the plan, or prints it with `dry_run`. Returns the first non-zero exit status
    (later steps do not start), else 0.

    Commands of one step start together; when one fails the others are terminated, since
    the processes of a multi-host run wait on each other and would otherwise hang.
    """
    if dry_run:
        for step in plan:
            for command in step:
                print(shlex.join(command))
        return 0
    for step in plan:
        for command in step:
            print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        if len(step) == 1:
            status = subprocess.run(step[0]).returncode
        else:
            status = _run_together(step, poll_seconds)
        if status:
            return status
    return 0


def _run_together(step: Step, poll_seconds: float) -> int:
    processes = [subprocess.Popen(command, stdin=subprocess.DEVNULL) for command in step]
    try:
        while True:
            statuses = [p.poll() for p in processes]
            failed = [s for s in statuses if s]
            if failed:
                return failed[0]
            if all(s == 0 for s in statuses):
                return 0
            time.sleep(poll_seconds)
    finally:
        for p in processes:
            if p.poll() is None:
                p.terminate()
        for p in processes:
            p.wait()


def run_cli(
    parser: argparse.ArgumentParser,
    build: Callable[[argparse.Namespace, list[str]], Plan],
    argv: Sequence[str] | None,
) -> int:
    """Parses `argv` (default sys.argv[1:]), builds the plan and executes it.

    A LaunchError becomes a usage error (exit status 2, message on stderr), like a
    malformed flag.
    """
    own, command = split_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    try:
        check_command_for(args.subcommand, command)
        plan = build(args, command)
    except LaunchError as e:
        parser.error(str(e))
    return execute(plan, args.dry_run)
