"""Metric writers: TensorBoard event files, a JSONL log, a console line, optional W&B.

`MetricWriter.write(step, metrics)` sends one dict of scalars to every enabled sink, with
the same wall time. Each sink flushes on every write, so a killed run keeps everything
written before the kill, and a resumed run appends to the same JSONL file.

TensorBoard files are written without TensorFlow or the `tensorboard` package: an event
file is a sequence of TFRecords, each holding one `Event` protobuf, and the few fields a
scalar summary needs are encoded by hand below. Heavy or optional imports (W&B,
matplotlib) happen only in the functions that need them.

Write from one process only in a multi-host run (`jax.process_index() == 0`); paths are
local files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import jax

Scalar = float | int

DEFAULT_PLOT_KEYS = (
    "eval/accuracy",
    "reward/mean",
    "response_length/mean",
    "loss/policy",
    "entropy",
    "kl",
)
DEFAULT_CONSOLE_KEYS = ("reward/mean", "eval/accuracy", "response_length/mean", "loss/policy")


# --- TFRecord framing and Event protobuf ---------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    """Byte-wise lookup table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data`, the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated and offset so CRCs of CRCs do not degenerate."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length (u64), masked CRC of the length, data, masked CRC of data."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values as their 64-bit two's complement."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings and sub-messages."""
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(
    wall_time: float,
    step: int = 0,
    *,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
) -> bytes:
    """Serialised `tensorflow.Event` with a file version or a scalar `Summary`.

    Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
    summary = 5 (Summary). Summary: repeated Value value = 1. Value: tag = 1 (string),
    simple_value = 2 (float).
    """
    event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        event += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        event += _bytes_field(5, summary)
    return event


# --- Sinks -------------------------------------------------------------------------------


class _Sink(Protocol):
    def write(self, step: int, metrics: Mapping[str, Scalar], wall_time: float) -> None: ...

    def close(self) -> None: ...


def _open_new(directory: str, stem: str) -> IO[bytes]:
    """Creates `directory/stem` (or `stem.1`, `stem.2`, ... if taken) for writing."""
    n = 0
    while True:
        try:
            return open(os.path.join(directory, stem if n == 0 else f"{stem}.{n}"), "xb")
        except FileExistsError:
            n += 1


class TensorBoardWriter:
    """Scalar summaries in a new event file under `logdir` (one file per run or resume)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        self._file = _open_new(logdir, stem)
        self.path = self._file.name
        self._write(encode_event(time.time(), file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))
        self._file.flush()

    def write(self, step: int, metrics: Mapping[str, Scalar], wall_time: float) -> None:
        self._write(encode_event(wall_time, step, scalars=metrics))

    def close(self) -> None:
        self._file.close()


class JsonlWriter:
    """One JSON object per line: `{"step", "time", **metrics}`, appended across resumes.

    The file is opened for each write, so nothing is buffered in between. A run killed
    mid-write can leave a partial last line; it is cut off on reopening so the file stays
    valid JSONL. Non-finite values are written as NaN / Infinity, which `json.loads`
    reads back.
    """

    def __init__(self, path: str):
        self.path = path
        _drop_partial_last_line(path)

    def write(self, step: int, metrics: Mapping[str, Scalar], wall_time: float) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": wall_time, **metrics}) + "\n")

    def close(self) -> None:
        pass


def _drop_partial_last_line(path: str) -> None:
    """Truncates `path` after its last newline (no-op if absent or complete)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        content = f.read()
        if content and not content.endswith(b"\n"):
            f.truncate(content.rfind(b"\n") + 1)


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics JSONL file, in the order written."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ConsoleWriter:
    """One line per write: step/total, the `keys` present, steps/s and ETA.

    The rate is measured between consecutive writes, so it excludes start-up and
    compilation once the second write has happened.
    """

    def __init__(
        self,
        total_steps: int | None = None,
        *,
        keys: Sequence[str] = DEFAULT_CONSOLE_KEYS,
        stream: IO[str] | None = None,
    ):
        self.total_steps = total_steps
        self.keys = tuple(keys)
        self._stream = stream
        self._last: tuple[int, float] | None = None

    def format(self, step: int, metrics: Mapping[str, Scalar], wall_time: float) -> str:
        """The line for this write; updates the rate measurement."""
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        parts += [f"{key} {metrics[key]:.4g}" for key in self.keys if key in metrics]
        if self._last is not None and step > self._last[0] and wall_time > self._last[1]:
            rate = (step - self._last[0]) / (wall_time - self._last[1])
            parts.append(f"{rate:.3g} steps/s")
            if self.total_steps:
                parts.append(f"ETA {_format_duration(max(self.total_steps - step, 0) / rate)}")
        self._last = (step, wall_time)
        return " | ".join(parts)

    def write(self, step: int, metrics: Mapping[str, Scalar], wall_time: float) -> None:
        stream = self._stream or sys.stdout
        print(self.format(step, metrics, wall_time), file=stream, flush=True)

    def close(self) -> None:
        pass


class WandbWriter:
    """Logs to Weights & Biases; the run id is kept in `workdir` so a resume continues it."""

    def __init__(self, workdir: str, project: str, config: dict | None):
        import wandb  # optional dependency, imported only when asked for

        id_path = os.path.join(workdir, "wandb_run_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w") as f:
                f.write(run_id)
        self._wandb = wandb
        self._run = wandb.init(
            project=project, id=run_id, resume="allow", config=config, dir=workdir
        )

    def write(self, step: int, metrics: Mapping[str, Scalar], wall_time: float) -> None:
        del wall_time
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


# --- Front end ---------------------------------------------------------------------------


def _to_scalar(key: str, value: Any) -> Scalar:
    """A Python int/float from a number or a 0-d array (NumPy or JAX)."""
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"metric {key!r} must be a scalar, got shape {array.shape}")
    if array.dtype.kind in "biu":
        return int(array)
    if array.dtype.kind in "fV":  # ml_dtypes (bfloat16, float8) have kind "V"
        return float(array.astype(np.float64))
    raise ValueError(f"metric {key!r} must be numeric, got dtype {array.dtype}")


class MetricWriter:
    """Writes scalar metrics to TensorBoard (`workdir/tb`), `workdir/metrics.jsonl`, the
    console and, if `wandb_project` is set, Weights & Biases."""

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        jsonl: bool = True,
        console: bool = True,
        wandb_project: str | None = None,
        total_steps: int | None = None,
        config: dict | None = None,
    ):
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._sinks: list[_Sink] = []
        if tensorboard:
            self._sinks.append(TensorBoardWriter(os.path.join(workdir, "tb")))
        if jsonl:
            self._sinks.append(JsonlWriter(self.jsonl_path))
        if console:
            self._sinks.append(ConsoleWriter(total_steps))
        if wandb_project is not None:
            self._sinks.append(WandbWriter(workdir, wandb_project, config))

    def write(self, step: int, metrics: Mapping[str, float | int | np.ndarray | jax.Array]) -> None:
        """Writes one dict of scalars for `step` to every sink."""
        scalars = {key: _to_scalar(key, value) for key, value in metrics.items()}
        wall_time = time.time()
        for sink in self._sinks:
            sink.write(int(step), scalars, wall_time)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _curves(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step; a step written twice (a run resumed
    from an earlier checkpoint) keeps its last value."""
    by_step = {record["step"]: record[key] for record in records if key in record}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def plot_curves(
    jsonl_path: str, png_path: str, keys: Sequence[str] = DEFAULT_PLOT_KEYS
) -> list[str]:
    """Plots each of `keys` found in the JSONL against step, in a grid, as a PNG.

    Keys absent from the file are skipped; returns the keys plotted. Writes nothing
    when none is present.
    """
    records = read_jsonl(jsonl_path)
    present = [key for key in keys if any(key in record for record in records)]
    if not present:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present, strict=False):
        steps, values = _curves(records, key)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(present) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return present
