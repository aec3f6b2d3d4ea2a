"""The local sweep runner: expands a sweep file into trials and runs, resumes or emits them.

    python -m launch.sweep run configs/sweeps/smoke.py                 # one after another
    python -m launch.sweep run configs/sweeps/paper_toy.py --parallel=3
    python -m launch.sweep run configs/sweeps/paper_toy.py --dry_run   # the plan, nothing run
    python -m launch.sweep run configs/sweeps/paper_toy.py --emit \\
        --wrap="python -m launch.tpu run --name=v5e --zone=us-west4-a --"  # one line per trial
    python -m launch.sweep summary runs/sweeps/paper_toy               # tables and plots

Sweep files and trial names are described in `deltal_jax/sweeps.py`. Every override is
validated against the base config before anything runs. Each trial runs as a subprocess,

    <trainer> --config=<file>:<preset> --workdir=<root>/<sweep>/<trial> --config.<field>=<value> ...

with its output appended to `<workdir>/log.txt`. The trainer resumes a work directory
from its checkpoint by itself, so a half-finished trial is simply run again with the same
command. A trial is finished when its work directory holds `DONE`, which the runner
writes after the command exits with status 0 and `metrics.jsonl` reaches the config's
total_steps (a run stopped by SIGTERM exits 0 before that and is not finished). Finished
trials are skipped; delete `DONE` to run one again. `<workdir>/trial.json` records what
the trial is; running a sweep whose trial of the same name now has different overrides
stops with an error instead of mixing two runs in one directory.

A failing trial is reported and the others go on; the exit status is 1 if any trial did
not finish. After a local run the summary is written to the sweep directory
(`deltal_jax.sweeps.summarize`).

Remote hardware: `--wrap=PREFIX` puts a launcher in front of every trial command (the
launcher runs the trial on the remote workers and exits with its status). With `--emit`
the commands are printed, shell-quoted, one per line, for any scheduler; without it they
are run here as above, and a zero exit of the launcher counts as finished (the trial's
metrics are on the remote machine). Emitted commands do not write `DONE`; re-running a
finished trial only restores its last checkpoint and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from deltal_jax import sweeps

DONE = "DONE"
LOG = "log.txt"
DEFAULT_ROOT = os.path.join("runs", "sweeps")
# `python -m` rather than the deltal-train script: it runs from the repository root
# whether or not the package is installed in the interpreter on PATH.
DEFAULT_TRAINER = "python -m deltal_jax.main"


def is_done(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, DONE))


def last_logged_step(workdir: str) -> int | None:
    """The largest step in `<workdir>/metrics.jsonl`, None if nothing was logged."""
    return max((r["step"] for r in sweeps.read_metrics(workdir)), default=None)


def _normalised(value):
    """`value` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def check_workdir(record: dict) -> None:
    """Raises SweepError if the trial's directory holds a different trial."""
    path = os.path.join(record["workdir"], sweeps.TRIAL_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    for key in ("config", "overrides"):
        if _normalised(old[key]) != _normalised(record[key]):
            raise sweeps.SweepError(
                f"{record['workdir']} holds a run with {key} {old[key]!r}; the sweep now "
                f"gives {record[key]!r}. Use another --root or sweep name, or remove the "
                f"directory."
            )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def run_trial(record: dict, argv: list[str], trust_exit: bool, tag: str) -> bool:
    """Runs one trial to the end (or failure); writes DONE and returns True if finished."""
    workdir = record["workdir"]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, sweeps.TRIAL_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    print(f"{tag} start   {record['name']}  (log: {os.path.join(workdir, LOG)})", flush=True)
    start = time.time()
    with open(os.path.join(workdir, LOG), "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
        log.flush()
        returncode = subprocess.run(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
        ).returncode
    elapsed = _duration(time.time() - start)
    step = last_logged_step(workdir)
    if returncode != 0:
        print(f"{tag} FAILED  {record['name']}  exit status {returncode} after {elapsed}, "
              f"last logged step {step}; see its log", flush=True)  # fmt: skip
        return False
    if not trust_exit and (step is None or step < record["total_steps"]):
        print(f"{tag} STOPPED {record['name']}  exit status 0 at step {step} of "
              f"{record['total_steps']} after {elapsed} (preempted?); run again to resume",
              flush=True)  # fmt: skip
        return False
    with open(os.path.join(workdir, DONE), "w", encoding="utf-8") as f:
        json.dump({"command": argv, "seconds": time.time() - start}, f)
    print(f"{tag} done    {record['name']}  in {elapsed}", flush=True)
    return True


def run_sweep(
    sweep_file: str,
    *,
    root: str = DEFAULT_ROOT,
    parallel: int = 1,
    only: str | None = None,
    trainer: str = DEFAULT_TRAINER,
    wrap: str = "",
    mode: str = "run",
) -> int:
    """Runs (mode "run"), plans ("dry_run") or prints ("emit") a sweep's unfinished
    trials; returns the exit status."""
    if mode not in ("run", "dry_run", "emit"):
        raise ValueError(f"mode={mode!r}; accepted: run, dry_run, emit.")
    if parallel < 1:
        raise sweeps.SweepError(f"--parallel={parallel}; accepted: an integer >= 1.")
    sweep = sweeps.load_sweep(sweep_file)
    trials = sweeps.expand(sweep, root)
    configs = dict(zip((t.name for t in trials), sweeps.resolve(sweep, trials), strict=True))
    if only:
        trials = sweeps.select(trials, only)
    prefix = shlex.split(wrap) + shlex.split(trainer)
    records = []
    for trial in trials:
        argv = sweeps.command(trial, sweep.config, prefix)
        records.append((sweeps.trial_record(sweep, trial, configs[trial.name], argv), argv))
    for record, _ in records:
        check_workdir(record)
    pending = [(r, a) for r, a in records if not is_done(r["workdir"])]

    if mode == "emit":
        for _, argv in pending:
            print(shlex.join(argv))
        return 0
    if mode == "dry_run":
        print(f"Sweep {sweep.name}: {len(records)} trials, {len(records) - len(pending)} "
              f"finished, {len(pending)} to run, {parallel} at a time.")  # fmt: skip
        for record, argv in records:
            step = last_logged_step(record["workdir"])
            if is_done(record["workdir"]):
                print(f"  {record['name']}: finished")
                continue
            state = "new" if step is None else f"resume (logged step {step} of "
            state += "" if step is None else f"{record['total_steps']})"
            print(f"  {record['name']}: {state}\n    {shlex.join(argv)}")
        return 0

    sweep_dir = os.path.join(root, sweep.name)
    print(f"Sweep {sweep.name}: {len(pending)} of {len(records)} trials to run, {parallel} at "
          f"a time, in {sweep_dir}", flush=True)  # fmt: skip
    jobs = [
        (record, argv, bool(wrap), f"[{i + 1}/{len(pending)}]")
        for i, (record, argv) in enumerate(pending)
    ]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        finished = list(pool.map(lambda job: run_trial(*job), jobs))
    failed = [record["name"] for (record, *_), ok in zip(jobs, finished, strict=True) if not ok]
    if any(os.path.isfile(os.path.join(r["workdir"], "metrics.jsonl")) for r, _ in records):
        sweeps.summarize(sweeps.read_records(sweep_dir), sweep_dir)
        print(f"Summary: {os.path.join(sweep_dir, 'summary.md')}")
    if failed:
        print(f"{len(failed)} trial(s) did not finish: {', '.join(failed)}")
        return 1
    print(f"All {len(records)} trials finished.")
    return 0


def summary(path: str, root: str = DEFAULT_ROOT) -> int:
    """Writes the summary of a sweep directory, or of a sweep file's trials under root."""
    if path.endswith(".py"):
        sweep = sweeps.load_sweep(path)
        trials = sweeps.expand(sweep, root)
        records = [
            sweeps.trial_record(sweep, t, c, [])
            for t, c in zip(trials, sweeps.resolve(sweep, trials), strict=True)
        ]
        out_dir = os.path.join(root, sweep.name)
    else:
        records, out_dir = sweeps.read_records(path), path
    sweeps.summarize(records, out_dir)
    with open(os.path.join(out_dir, "summary.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"Written to {out_dir}: summary.md, summary.csv, trials.csv, accuracy_vs_alpha.png, "
          f"curves.png")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.sweep", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run, plan or emit the unfinished trials of a sweep")
    run.add_argument("sweep_file", help="configs/sweeps/NAME.py")
    run.add_argument("--root", default=DEFAULT_ROOT, help="trials go to ROOT/<sweep>/<trial>")
    run.add_argument("--parallel", type=int, default=1, help="trials run at the same time")
    run.add_argument("--only", help="run only trials whose name matches this glob")
    run.add_argument("--trainer", default=DEFAULT_TRAINER, help="the training command")
    run.add_argument("--wrap", default="", help="launcher prefix put before each command")
    modes = run.add_mutually_exclusive_group()
    modes.add_argument("--dry_run", action="store_true", help="print the plan, run nothing")
    modes.add_argument("--emit", action="store_true", help="print one command per trial")
    summ = commands.add_parser("summary", help="tables and plots of a sweep's results")
    summ.add_argument("path", help="the sweep directory ROOT/<sweep>, or the sweep file")
    summ.add_argument("--root", default=DEFAULT_ROOT, help="with a sweep file: its ROOT")
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            return summary(args.path, args.root)
        mode = "emit" if args.emit else "dry_run" if args.dry_run else "run"
        return run_sweep(
            args.sweep_file, root=args.root, parallel=args.parallel, only=args.only,
            trainer=args.trainer, wrap=args.wrap, mode=mode,
        )  # fmt: skip
    except sweeps.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
