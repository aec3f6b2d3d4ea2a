"""Sweeps: a grid of training runs defined in a file, and the summary of their results.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()` returning a plain dict:

    {
        "config": "configs/countdown_tiny.py:toy",   # base config file and preset
        "name": "paper_toy",                          # optional; default: the file's stem
        "overrides": {"total_steps": 100},            # optional; set in every trial
        "arms": {                                     # the methods compared: name -> overrides
            "grpo": {"loss.aggregation": "seq-mean-token-mean"},
            "dl_a0.5": {"loss.aggregation": "delta-l", "loss.alpha": 0.5},
        },
        "grid": {"rollout.max_response_len": [16, 24], "seed": [0, 1, 2]},  # product
    }

Arms exist because some fields only make sense together (α only for ΔL); the grid is a
Cartesian product over any other fields. Trials are arms × grid, arm-major, the grid in
the order written with its last field varying fastest. A trial's name is its arm followed
by one `<label><value>` part per grid field (`LABELS`, else the field's last component):
`dl_a0.5-M16-s0`. Its work directory is `<root>/<sweep name>/<trial name>`.

Every override key is checked against the loaded base config when the sweep is expanded
(`resolve`): an unknown field, a value of the wrong type, a field set in two places, and
any value `config.validate` rejects fail before anything runs, naming the trial and field.

The summary (`summarize`) reads each trial's `metrics.jsonl` and computes, per trial,
from the held-out evaluation curve (eval/accuracy = Avg@k at every eval step, step 0
included):

    final_accuracy   Avg@k at the last step;  final_pass  Pass@k at the last step
    best_accuracy    max over eval steps (best_step: the first step reaching it)
    monotonicity     Kendall's τ_b between step and accuracy (`kendall_tau`): +1 when
                     accuracy only rises, −1 when it only falls, 0 for a flat curve
    max_drop         the largest fall below the running maximum (`max_drop`), ≥ 0;
                     0 for a curve that never falls
    final_response_length   mean held-out response length at the last step

then the mean and the sample standard deviation (ddof = 1; undefined, shown blank, for a
single seed) over the trials that differ only in `seed`. Only complete trials (their
metrics reach the config's total_steps) enter the means and plots; the per-trial table
lists every trial with its status. Written to the sweep directory: `trials.csv`,
`summary.csv`, `summary.md`, `accuracy_vs_alpha.png` and `curves.png`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import fnmatch
import importlib.util
import itertools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from deltal_jax import aggregation
from deltal_jax import config as config_lib

# Short labels of common grid fields in trial names and table columns.
LABELS = {
    "rollout.max_response_len": "M",
    "seed": "s",
    "loss.alpha": "a",
    "rollout.group_size": "G",
    "rollout.prompts_per_step": "B",
    "optim.learning_rate": "lr",
    "total_steps": "T",
}
SEED = "seed"  # the grid field whose trials are replicates, averaged in the summary
ALPHA = "loss.alpha"
TRIAL_FILE = "trial.json"
_NAME_CHARS = re.compile(r"^[A-Za-z0-9._+-]+$")
_SWEEP_KEYS = ("config", "name", "overrides", "arms", "grid")
METRICS = (
    "final_accuracy",
    "final_pass",
    "best_accuracy",
    "monotonicity",
    "max_drop",
    "final_response_length",
)


class SweepError(ValueError):
    """A malformed sweep file, a bad override or an inconsistent sweep directory."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    config: str  # "path/to/config.py[:preset]"
    arms: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]
    overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int  # position in the expansion order
    name: str
    arm: str
    grid: dict[str, Any]  # this trial's value of each grid field
    overrides: dict[str, Any]  # everything it sets: sweep overrides, then arm, then grid
    workdir: str


# --- Sweep definition -----------------------------------------------------------------


def _import_file(path: str, what: str):
    if not os.path.isfile(path):
        raise SweepError(
            f"{what} {path!r} not found; paths are relative to the directory you run "
            f"from (the repository root)."
        )
    name = "_sweep_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def from_dict(spec: Mapping[str, Any], name: str) -> Sweep:
    """Checks the structure of a `get_sweep()` dict and returns it as a `Sweep`."""
    unknown = sorted(set(spec) - set(_SWEEP_KEYS))
    if unknown:
        raise SweepError(f"sweep {name}: unknown keys {unknown}; accepted: {_SWEEP_KEYS}.")
    name = spec.get("name", name)
    if not isinstance(name, str) or not _NAME_CHARS.match(name):
        raise SweepError(f"sweep name {name!r} must be non-empty and use only A-Z a-z 0-9 . _ + -.")
    config = spec.get("config")
    if not isinstance(config, str) or not config:
        raise SweepError(f"sweep {name}: 'config' must be a string 'path/to/config.py[:preset]'.")
    arms = spec.get("arms")
    if not isinstance(arms, Mapping) or not arms:
        raise SweepError(f"sweep {name}: 'arms' must be a non-empty dict name -> overrides.")
    for arm, overrides in arms.items():
        if not isinstance(arm, str) or not _NAME_CHARS.match(arm):
            raise SweepError(
                f"sweep {name}: arm name {arm!r} must be non-empty and use only "
                f"A-Z a-z 0-9 . _ + -."
            )
        if not isinstance(overrides, Mapping):
            raise SweepError(f"sweep {name}: arm {arm!r} must map field -> value.")
    grid = spec.get("grid", {})
    if not isinstance(grid, Mapping):
        raise SweepError(f"sweep {name}: 'grid' must be a dict field -> list of values.")
    for key, values in grid.items():
        if not isinstance(values, list | tuple) or not values:
            raise SweepError(f"sweep {name}: grid field {key!r} needs a non-empty list of values.")
    overrides = spec.get("overrides", {})
    if not isinstance(overrides, Mapping):
        raise SweepError(f"sweep {name}: 'overrides' must be a dict field -> value.")
    return Sweep(
        name=name,
        config=config,
        arms={arm: dict(o) for arm, o in arms.items()},
        grid={key: list(values) for key, values in grid.items()},
        overrides=dict(overrides),
    )


def load_sweep(path: str) -> Sweep:
    """Reads a sweep file: calls its `get_sweep()`; the name defaults to the file's stem."""
    module = _import_file(path, "sweep file")
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"sweep file {path!r} defines no get_sweep().")
    stem = os.path.splitext(os.path.basename(path))[0]
    return from_dict(module.get_sweep(), stem)


def _label(key: str) -> str:
    return LABELS.get(key, key.rsplit(".", 1)[-1])


def _format_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "_".join(_format_value(v) for v in value)
    return str(value)


def expand(sweep: Sweep, root: str) -> list[Trial]:
    """The sweep's trials: arms × product(grid), named `<arm>-<label><value>-...`."""
    labels = {}
    for key in sweep.grid:
        if _label(key) in labels:
            raise SweepError(
                f"sweep {sweep.name}: grid fields {labels[_label(key)]!r} and {key!r} share "
                f"the name label {_label(key)!r}; sweep one of them through arms."
            )
        labels[_label(key)] = key
    for arm, arm_overrides in sweep.arms.items():
        for key in arm_overrides:
            if key in sweep.overrides or key in sweep.grid:
                place = "overrides" if key in sweep.overrides else "grid"
                raise SweepError(
                    f"sweep {sweep.name}: field {key!r} is set both by arm {arm!r} and in "
                    f"'{place}'; set each field in one place."
                )
    for key in sweep.grid:
        if key in sweep.overrides:
            raise SweepError(
                f"sweep {sweep.name}: field {key!r} is in both 'grid' and 'overrides'; "
                f"set each field in one place."
            )

    trials: list[Trial] = []
    names: set[str] = set()
    for arm, arm_overrides in sweep.arms.items():
        for values in itertools.product(*sweep.grid.values()):
            grid = dict(zip(sweep.grid, values, strict=True))
            parts = [arm] + [_label(k) + _format_value(v) for k, v in grid.items()]
            name = "-".join(parts)
            if not _NAME_CHARS.match(name):
                raise SweepError(
                    f"sweep {sweep.name}: trial name {name!r} has characters other than "
                    f"A-Z a-z 0-9 . _ + -; sweep such values through arms."
                )
            if name in names:
                raise SweepError(f"sweep {sweep.name}: two trials are named {name!r}.")
            names.add(name)
            trials.append(
                Trial(
                    index=len(trials),
                    name=name,
                    arm=arm,
                    grid=grid,
                    overrides={**sweep.overrides, **arm_overrides, **grid},
                    workdir=os.path.join(root, sweep.name, name),
                )
            )
    return trials


def select(trials: Sequence[Trial], pattern: str) -> list[Trial]:
    """The trials whose name matches the shell-style `pattern` (`dl_*-M16-*`)."""
    chosen = [t for t in trials if fnmatch.fnmatchcase(t.name, pattern)]
    if not chosen:
        names = ", ".join(t.name for t in trials)
        raise SweepError(f"no trial name matches {pattern!r}; trials: {names}.")
    return chosen


# --- Configs and commands ---------------------------------------------------------------


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of `path/to/file.py[:preset]`: the file's `get_config(preset)`."""
    path, sep, arg = spec.partition(".py:")
    path = path + ".py" if sep else spec
    module = _import_file(path, "config file")
    try:
        return module.get_config(arg if sep else None)
    except ValueError as e:  # an unknown preset
        raise SweepError(f"config {spec!r}: {e}") from None


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str
) -> None:
    """Sets each dotted field of `overrides` in `config`, which must already have it."""
    for key, value in overrides.items():
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(parts[:depth]) or "the top level"
                fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise SweepError(
                    f"{where}: unknown config field {key!r}; fields of {parent}: "
                    f"{', '.join(fields) or '(none: not a group)'}."
                )
            if depth < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], ml_collections.ConfigDict):
            raise SweepError(
                f"{where}: {key!r} is a group, not a field; accepted: "
                + ", ".join(f"{key}.{f}" for f in sorted(node[parts[-1]].keys()))
                + "."
            )
        try:
            node[parts[-1]] = value
        except TypeError:
            current = node[parts[-1]]
            raise SweepError(
                f"{where}: {key}={value!r} has type {type(value).__name__}; the field holds "
                f"{type(current).__name__} (default {current!r})."
            ) from None


def resolve(sweep: Sweep, trials: Sequence[Trial]) -> list[ml_collections.ConfigDict]:
    """Each trial's full config: the base config with its overrides, validated."""
    base = load_config(sweep.config)
    configs = []
    for trial in trials:
        config = copy.deepcopy(base)
        apply_overrides(config, trial.overrides, f"sweep {sweep.name}, trial {trial.name}")
        try:
            config_lib.validate(config)
        except config_lib.ConfigError as e:
            raise SweepError(f"sweep {sweep.name}, trial {trial.name}: {e}") from None
        configs.append(config)
    return configs


def cli_value(value: Any) -> str:
    """`value` as the trainer's flag parser reads it back: strings verbatim, the rest as
    Python literals (`0.75`, `True`, `(3, 4)`)."""
    return value if isinstance(value, str) else repr(value)


def command(trial: Trial, config_spec: str, trainer: Sequence[str]) -> list[str]:
    """The trainer command line of one trial (an argument list, no shell)."""
    return [
        *trainer,
        f"--config={config_spec}",
        f"--workdir={trial.workdir}",
        *(f"--config.{key}={cli_value(value)}" for key, value in trial.overrides.items()),
    ]


def trial_record(
    sweep: Sweep, trial: Trial, config: ml_collections.ConfigDict, cmd: Sequence[str]
) -> dict[str, Any]:
    """What the summary needs to know about a trial (written as `<workdir>/trial.json`)."""
    return {
        "sweep": sweep.name,
        "index": trial.index,
        "name": trial.name,
        "arm": trial.arm,
        "config": sweep.config,
        "grid": trial.grid,
        "overrides": trial.overrides,
        "command": list(cmd),
        "workdir": trial.workdir,
        "total_steps": config.total_steps,
        "aggregation": aggregation.canonical_mode(config.loss.aggregation),
        "alpha": config.loss.alpha,
        "max_response_len": config.rollout.max_response_len,
        "seed": config.seed,
        "eval_num_samples": config.eval.num_samples,
    }


def read_records(sweep_dir: str) -> list[dict[str, Any]]:
    """The `trial.json` of every trial directory under `sweep_dir`, in expansion order,
    with `workdir` set to where each was found."""
    if not os.path.isdir(sweep_dir):
        raise SweepError(f"sweep directory {sweep_dir!r} does not exist.")
    records = []
    for entry in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, entry, TRIAL_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                records.append({**json.load(f), "workdir": os.path.join(sweep_dir, entry)})
    if not records:
        raise SweepError(
            f"no trial directories (with {TRIAL_FILE}) under {sweep_dir!r}; pass the sweep "
            f"directory, <root>/<sweep name>, or the sweep file."
        )
    return sorted(records, key=lambda r: r["index"])


# --- Per-trial scores --------------------------------------------------------------------


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ_b = (C − D) / √((n₀ − n_x)(n₀ − n_y)).

    Over the n₀ = n(n−1)/2 pairs i < j: C concordant ((x_j − x_i)(y_j − y_i) > 0),
    D discordant (< 0), n_x and n_y the pairs tied in x and in y. Ties in accuracy are
    common on small eval sets, hence τ_b. Returns 0 when it is undefined (fewer than two
    points, or x or y constant): such a curve has no ordering either way.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"kendall_tau needs sequences of equal length, got {n} and {len(y)}.")
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(n), 2):
        dx, dy = x[j] - x[i], y[j] - y[i]
        ties_x += dx == 0
        ties_y += dy == 0
        concordant += dx * dy > 0
        discordant += dx * dy < 0
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return (concordant - discordant) / denominator if denominator else 0.0


def max_drop(values: Sequence[float]) -> float:
    """max_t (max_{s ≤ t} v_s − v_t): the largest fall below the running maximum."""
    peak, drop = -math.inf, 0.0
    for value in values:
        peak = max(peak, value)
        drop = max(drop, peak - value)
    return drop


def eval_curve(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step; a step written twice (a run resumed from
    an earlier checkpoint redoes steps) keeps its last value."""
    by_step = {r["step"]: r[key] for r in records if key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl` ([] if absent). A last line without its
    newline is a write cut short (a killed or running trial) and is left out, as the
    trainer's writer drops it on resuming."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]  # the last piece is "" or unterminated
    return [json.loads(line) for line in lines if line.strip()]


def trial_result(record: Mapping[str, Any]) -> dict[str, Any]:
    """Status and scores of one trial from its `metrics.jsonl` (see the module docstring).
    Scores are None when no evaluation was logged; `curve` is (steps, Avg@k)."""
    path = os.path.join(record["workdir"], "metrics.jsonl")
    metrics = read_metrics(record["workdir"])
    last_step = max((r["step"] for r in metrics), default=None)
    steps, accuracy = eval_curve(metrics, "eval/accuracy")
    k = record["eval_num_samples"]
    result: dict[str, Any] = {
        "status": "complete" if steps and steps[-1] >= record["total_steps"] else "incomplete",
        "last_step": last_step,
        "curve": (steps, accuracy),
        **dict.fromkeys(("best_step", *METRICS)),
    }
    if steps:
        best = max(accuracy)
        result.update(
            final_accuracy=accuracy[-1],
            final_pass=_final(metrics, f"eval/pass@{k}", path),
            best_accuracy=best,
            best_step=steps[accuracy.index(best)],
            monotonicity=kendall_tau(steps, accuracy),
            max_drop=max_drop(accuracy),
            final_response_length=_final(metrics, "eval/response_length", path),
        )
    return result


def _final(metrics: Sequence[Mapping[str, Any]], key: str, path: str) -> float:
    values = eval_curve(metrics, key)[1]
    if not values:
        raise SweepError(f"{path} logs eval/accuracy but not {key!r}.")
    return values[-1]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation √(Σ(v − mean)² / (n − 1)); std is NaN for n = 1."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


# --- Summary -------------------------------------------------------------------------------


def _grid_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for r in records for key in r["grid"]))


def _column(key: str) -> str:
    return SEED if key == SEED else _label(key)


def _alpha(record: Mapping[str, Any]) -> float | None:
    return record["alpha"] if record["aggregation"] == aggregation.DELTA_L else None


def summarize(records: Sequence[Mapping[str, Any]], out_dir: str) -> dict[str, list[dict]]:
    """Per-trial scores and their mean ± std over seeds; writes, in `out_dir`,
    `trials.csv` (one row per trial), `summary.csv` (one row per arm × non-seed grid
    point), `summary.md` (both tables) and the plots `accuracy_vs_alpha.png` and
    `curves.png` (one panel per value of the grid fields other than seed and α).

    Returns {"trials": rows, "groups": rows} as written to the CSV files.
    """
    keys = _grid_keys(records)
    group_keys = [k for k in keys if k != SEED]
    trials, curves = [], {}
    for record in records:
        result = trial_result(record)
        curves[record["name"]] = result.pop("curve")
        trials.append(
            {
                "trial": record["name"],
                "arm": record["arm"],
                "aggregation": record["aggregation"],
                "alpha": _alpha(record),
                **{_column(k): record["grid"].get(k) for k in keys},
                "k": record["eval_num_samples"],
                **result,
            }
        )

    members: dict[tuple, list[int]] = {}
    for i, (record, row) in enumerate(zip(records, trials, strict=True)):
        if row["status"] == "complete":
            key = (record["arm"], *(json.dumps(record["grid"].get(k)) for k in group_keys))
            members.setdefault(key, []).append(i)
    groups = []
    for indices in members.values():
        first = records[indices[0]]
        row = {
            "group": "-".join(
                [first["arm"]] + [_label(k) + _format_value(first["grid"][k]) for k in group_keys]
            ),
            "arm": first["arm"],
            "aggregation": first["aggregation"],
            "alpha": _alpha(first),
            **{_column(k): first["grid"].get(k) for k in group_keys},
            "k": first["eval_num_samples"],
            "n": len(indices),
            "trials": [trials[i]["trial"] for i in indices],
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(
                [trials[i][metric] for i in indices]
            )
        groups.append(row)

    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, "trials.csv"), trials)
    _write_csv(
        os.path.join(out_dir, "summary.csv"),
        [{**g, "trials": " ".join(g["trials"])} for g in groups],
    )
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(trials, groups, [_column(k) for k in keys]))
    panel_keys = [k for k in group_keys if k != ALPHA]
    plot_accuracy_vs_alpha(groups, [_column(k) for k in panel_keys], out_dir)
    plot_group_curves(groups, curves, [_column(k) for k in panel_keys], out_dir)
    return {"trials": trials, "groups": groups}


def _write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Numbers at full precision (repr); None and NaN as empty cells."""
    if not rows:
        with open(path, "w", encoding="utf-8"):
            return
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def _md(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(
    trials: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]], grid: list[str]
) -> str:
    """The two tables of `summarize` as Markdown, numbers to 3 decimals, mean ± std."""
    ks = sorted({t["k"] for t in trials})
    group_grid = [c for c in grid if c != SEED]
    scores = ("final_accuracy", "final_pass", "best_accuracy", "monotonicity", "max_drop")
    names = ("Avg@k", "Pass@k", "best Avg@k", "monotonicity τ", "max drop")
    out = [
        "# Sweep summary\n\n",
        f"k = {', '.join(map(str, ks))} samples per held-out prompt. Avg@k and Pass@k at "
        "the final step; best Avg@k over eval steps; monotonicity: Kendall's τ_b of Avg@k "
        "against step; max drop: largest fall of Avg@k below its running maximum. Mean ± "
        "sample std (ddof = 1) over seeds, complete trials only.\n\n",
        "## Mean ± std over seeds\n\n",
    ]
    rows = []
    for g in groups:
        alpha = "–" if g["alpha"] is None else _format_value(g["alpha"])
        cells = [g["arm"], alpha, *(_format_value(g[c]) for c in group_grid), str(g["n"])]
        for metric in scores:
            mean, std = g[f"{metric}_mean"], g[f"{metric}_std"]
            cells.append(_md(mean) if math.isnan(std) else f"{_md(mean)} ± {_md(std)}")
        rows.append(cells)
    out.append(_md_table(["arm", "α", *group_grid, "n", *names], rows))
    out.append("\n## Trials\n\n")
    rows = [
        [t["trial"], t["status"], _md(t["last_step"]), *(_md(t[m]) for m in scores)] for t in trials
    ]
    out.append(_md_table(["trial", "status", "last step", *names], rows))
    return "".join(out)


def _panels(groups: Sequence[Mapping[str, Any]], columns: list[str]) -> dict[tuple, list]:
    panels: dict[tuple, list] = {}
    for g in groups:
        panels.setdefault(tuple(g[c] for c in columns), []).append(g)
    return panels


def _panel_title(columns: list[str], key: tuple) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True)) or "all"


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 3.8), squeeze=False)
    return plt, fig, axes[0]


def plot_accuracy_vs_alpha(
    groups: Sequence[Mapping[str, Any]], columns: list[str], out_dir: str
) -> None:
    """Final Avg@k (mean ± std over seeds) against α: ΔL arms as points joined by a line,
    every other arm as a horizontal line with a ± std band. One panel per `columns` value."""
    panels = _panels(groups, columns)
    if not panels:
        return
    plt, fig, axes = _figure(len(panels))
    for ax, (key, members) in zip(axes, panels.items(), strict=True):
        delta_l = sorted((g for g in members if g["alpha"] is not None), key=lambda g: g["alpha"])
        if delta_l:
            ax.errorbar(
                [g["alpha"] for g in delta_l],
                [g["final_accuracy_mean"] for g in delta_l],
                yerr=[_zero_nan(g["final_accuracy_std"]) for g in delta_l],
                marker="o",
                capsize=3,
                color="black",
                label="ΔL",
            )
        for i, g in enumerate(g for g in members if g["alpha"] is None):
            mean, std = g["final_accuracy_mean"], _zero_nan(g["final_accuracy_std"])
            color = f"C{i}"
            ax.axhline(mean, color=color, linestyle="--", label=g["arm"])
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
        ax.set_xlim(-0.05, 1.05)
        ax.set_xlabel("α")
        ax.set_ylabel(f"final Avg@{members[0]['k']}")
        ax.set_title(_panel_title(columns, key))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_alpha.png"), dpi=100)
    plt.close(fig)


def _zero_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def plot_group_curves(
    groups: Sequence[Mapping[str, Any]],
    curves: Mapping[str, tuple[list[int], list[float]]],
    columns: list[str],
    out_dir: str,
) -> None:
    """Held-out Avg@k against step, one line per arm (mean over seeds, ± std band) at the
    eval steps every seed has; one panel per `columns` value."""
    panels = _panels(groups, columns)
    if not panels:
        return
    plt, fig, axes = _figure(len(panels))
    for ax, (key, members) in zip(axes, panels.items(), strict=True):
        for i, g in enumerate(members):
            per_seed = [dict(zip(*curves[name], strict=True)) for name in g["trials"]]
            steps = sorted(set.intersection(*(set(c) for c in per_seed)))
            stats = [mean_std([c[s] for c in per_seed]) for s in steps]
            mean = [m for m, _ in stats]
            std = [_zero_nan(s) for _, s in stats]
            ax.plot(steps, mean, color=f"C{i}", label=g["group"])
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=f"C{i}",
                alpha=0.15,
            )
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out Avg@{members[0]['k']}")
        ax.set_title(_panel_title(columns, key))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)
