"""Every notebook in notebooks/ is committed clean and executes top to bottom.

The convention shared by the notebooks: the first code cell is tagged `parameters` and
sets `SMOKE = False`; the harness inserts a cell `SMOKE = True` right after it (as
papermill would), so anything derived from SMOKE lives in later cells. Each notebook runs
with nbclient in a fresh kernel whose working directory is a temporary directory, so
nothing is written into the repository, and which imports this checkout (its root is put
first on the kernel's PYTHONPATH) rather than whatever copy is installed. The kernel
inherits the test environment, so JAX sees the 8 fake CPU devices of conftest.py.
"""

import ast
import glob
import json
import os
import re

import nbclient
import nbformat
import pytest

from configs import countdown_tiny
from deltal_jax.metrics import read_jsonl
from deltal_jax.rewards import countdown_reward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(path) for path in NOTEBOOKS]


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def assigned_constants(source: str) -> dict[str, object]:
    """`NAME = <literal>` (or `NAME: type = <literal>`) at the top level of a cell."""
    constants = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    return constants


def reads(source: str, name: str) -> bool:
    """Whether the cell's code reads the variable `name`."""
    return any(
        isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)
        for node in ast.walk(ast.parse(source))
    )


def execute_smoke(name: str, workdir: str) -> nbformat.NotebookNode:
    """Runs notebook `name` with `SMOKE = True` injected after its parameters cell."""
    nb = read(name)
    index = next(
        i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])
    )
    smoke = nbformat.v4.new_code_cell("SMOKE = True", metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, smoke)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": workdir}}
    )
    return client.execute(env=env)


def test_the_notebooks_are_found():
    assert "quickstart.ipynb" in NAMES, NOTEBOOKS


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_with_a_smoke_parameter(name):
    nb = read(name)
    nbformat.validate(nb)
    cells = code_cells(nb)
    for i, cell in enumerate(cells):
        assert cell.outputs == [], f"{name}: code cell {i} was committed with outputs"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"
    assert nb.cells[0].cell_type == "markdown", f"{name}: the first cell should be the title"
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert tagged == [0], f"{name}: the first code cell (only) must be tagged 'parameters'"
    assert assigned_constants(cells[0].source).get("SMOKE") is False, (
        f"{name}: the parameters cell must set SMOKE = False"
    )
    # SMOKE = True is injected after this cell: a value derived from SMOKE here would
    # keep its full-size setting.
    assert not reads(cells[0].source, "SMOKE"), (
        f"{name}: derive values from SMOKE in a later cell, not in the parameters cell"
    )


@pytest.mark.slow  # each notebook trains a tiny model (the quickstart: ~45 s of CPU time)
@pytest.mark.parametrize("name", NAMES)
def test_executes_under_smoke(name, tmp_path):
    nb = execute_smoke(name, str(tmp_path))
    for i, cell in enumerate(code_cells(nb)):
        assert cell.execution_count is not None, f"{name}: code cell {i} did not run"
        errors = [out for out in cell.outputs if out.output_type == "error"]
        assert not errors, f"{name}: code cell {i} raised {errors}"
    if name == "quickstart.ipynb":
        check_quickstart(nb, tmp_path / "runs" / "quickstart-smoke")


def check_quickstart(nb: nbformat.NotebookNode, workdir) -> None:
    """The run matches the smoke preset, logged every step, drew its curves, and its
    samples came from the final checkpoint and were scored right."""
    # The notebook sets the preset's fields by hand (configs/ is not installed): no drift.
    with open(workdir / "config.json") as f:
        assert json.load(f) == json.loads(countdown_tiny.get_config("smoke").to_json_best_effort())

    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    evals = [r["step"] for r in records if "eval/accuracy" in r]
    assert evals == [0, 2]  # before RL, and eval.every = 2
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in records if "eval/accuracy" in r)

    images = [
        out for cell in code_cells(nb) for out in cell.outputs if "image/png" in out.get("data", {})
    ]
    assert len(images) == 1, "the curves cell should draw one figure inline"

    samples = read_jsonl(workdir / "samples.jsonl")
    assert len(samples) == 8
    for s in samples:
        assert s["step"] == 2  # restored from the last checkpoint, not the warm-up model
        # The verifier's metadata is that of the prompt shown ("3 7 12=22:").
        numbers, target = re.fullmatch(r"([\d ]+)=(\d+):", s["prompt"]).groups()
        assert s["meta"] == {"numbers": [int(n) for n in numbers.split()], "target": int(target)}
        assert s["reward"] == countdown_reward(s["response"], s["meta"]).score
