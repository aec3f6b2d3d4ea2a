"""Command-line entry point: `deltal-train --config=configs/countdown_tiny.py --workdir=DIR`.

With no arguments it runs the default CPU configuration (`deltal_jax.config.base_config`,
the same as configs/countdown_tiny.py) into a fresh directory under runs/. Any field can
be overridden: `--config.loss.alpha=0.5 --config.rollout.max_response_len=32`. A work
directory that already holds a checkpoint is resumed.

Multi-host runs start the same command on every host (one process per host) with either

  --distributed                      `jax.distributed.initialize()` finds the coordinator,
                                     the process count and this process's id itself
                                     (Cloud TPU pods and multi-slice, SLURM, Open MPI, ...)
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                                     explicit (multi-node GPU, several CPU processes on one
                                     machine); HOST:PORT is reachable on process 0's host

and the same `--workdir` on a shared file system. This happens first thing, before
anything touches JAX devices, as JAX requires.
"""

from __future__ import annotations

import datetime
import os

from absl import app, flags, logging
from ml_collections import config_flags

from deltal_jax import config as config_lib
from deltal_jax import hostmem

_EXPLICIT = ("coordinator_address", "num_processes", "process_id")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<timestamp>).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host run: jax.distributed.initialize() with cluster auto-detection.",
)  # fmt: skip
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of the coordinator (on process 0's host); with --num_processes and "
    "--process_id, starts a multi-process run explicitly.",
)  # fmt: skip
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (explicit).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..N-1 (explicit).")


def distributed_args(
    distributed: bool,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` the flags ask for, or None
    for a single-process run.

    `--distributed` alone gives {} (auto-detection); the three explicit flags must come
    together (with or without `--distributed`). Raises ValueError naming the bad flag.
    """
    given = dict(zip(_EXPLICIT, (coordinator_address, num_processes, process_id), strict=True))
    present = [name for name, value in given.items() if value is not None]
    if not present:
        return {} if distributed else None
    missing = [f"--{name}" for name in _EXPLICIT if name not in present]
    if missing:
        raise ValueError(
            f"an explicit multi-process start needs --coordinator_address, --num_processes "
            f"and --process_id together; missing {', '.join(missing)} (or pass --distributed "
            f"alone to let JAX detect the cluster)"
        )
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--coordinator_address={coordinator_address!r} must be HOST:PORT with a port in "
            f"1..65535, e.g. 10.0.0.1:1234"
        )
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} must be in 0..{num_processes - 1} "
            f"(--num_processes={num_processes})"
        )
    return given


def initialize_distributed(kwargs: dict) -> None:
    """Joins the multi-controller runtime; must run before JAX touches any device."""
    import jax

    # Cross-process collectives between CPU processes (the default in recent JAX; set so
    # the CPU multi-process runs and tests do not depend on that default).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    print(
        f"Process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices"
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        multihost = distributed_args(
            _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if multihost is not None and not _WORKDIR.value:
        # Each process would otherwise pick its own timestamped directory.
        raise app.UsageError("a multi-process run needs --workdir, the same on every process")
    config = _CONFIG.value if _CONFIG.value is not None else config_lib.base_config()
    workdir = _WORKDIR.value or os.path.join(
        "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from None
    if multihost is not None:  # after the cheap checks: it waits for every process
        initialize_distributed(multihost)
    from deltal_jax import train  # after flag parsing: keeps --help fast

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    print(f"Work directory: {os.path.abspath(workdir)}")
    final = train.train(config, workdir)
    summary = {k: v for k, v in final.items() if k.startswith("eval/")}
    print(f"Done. Final evaluation: {summary}. Curves: {os.path.join(workdir, 'curves.png')}")


def run() -> None:
    """Console-script entry point."""
    hostmem.use_huge_pages()  # may re-execute this command: first, before JAX starts
    app.run(main)


if __name__ == "__main__":
    run()
