"""Command-line entry point: `deltal-train --config=configs/countdown_tiny.py --workdir=DIR`.

With no arguments it runs the default CPU configuration (`deltal_jax.config.base_config`,
the same as configs/countdown_tiny.py) into a fresh directory under runs/. Any field can
be overridden: `--config.loss.alpha=0.5 --config.rollout.max_response_len=32`. A work
directory that already holds a checkpoint is resumed.
"""

from __future__ import annotations

import datetime
import os

from absl import app, flags, logging
from ml_collections import config_flags

from deltal_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<timestamp>).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from deltal_jax import train  # after flag parsing: keeps --help fast

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value if _CONFIG.value is not None else config_lib.base_config()
    workdir = _WORKDIR.value or os.path.join(
        "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from None
    print(f"Work directory: {os.path.abspath(workdir)}")
    final = train.train(config, workdir)
    summary = {k: v for k, v in final.items() if k.startswith("eval/")}
    print(f"Done. Final evaluation: {summary}. Curves: {os.path.join(workdir, 'curves.png')}")


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
