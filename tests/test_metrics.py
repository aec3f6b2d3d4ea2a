"""Metric writers: TFRecord/Event encoding read back independently, JSONL resume, console,
W&B wiring with a stand-in module, lazy imports, curve plots."""

import glob
import io
import json
import math
import os
import struct
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from deltal_jax import metrics
from deltal_jax.metrics import ConsoleWriter, MetricWriter, crc32c, plot_curves, read_jsonl


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time (no table): a second implementation to compare with."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return ~crc & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def read_tfrecords(path: str) -> list[bytes]:
    """Payloads of a TFRecord file, checking both CRCs of every record."""
    records = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            assert unmask(struct.unpack("<I", header[8:])[0]) == crc32c_bitwise(header[:8])
            data = f.read(length)
            (data_crc,) = struct.unpack("<I", f.read(4))
            assert unmask(data_crc) == crc32c_bitwise(data)
            records.append(data)
    return records


def parse_proto(data: bytes) -> dict[int, list]:
    """Protobuf wire format to {field number: [raw values]} (varint, fixed64/32, bytes)."""
    fields: dict[int, list] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = varint()
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            assert wire_type == 2, wire_type
            length = varint()
            value, pos = data[pos : pos + length], pos + length
        fields.setdefault(number, []).append(value)
    return fields


def decode_event(data: bytes) -> dict:
    fields = parse_proto(data)
    event = {
        "wall_time": struct.unpack("<d", fields[1][0])[0],
        "step": fields.get(2, [0])[0],
    }
    if 3 in fields:
        event["file_version"] = fields[3][0].decode()
    if 5 in fields:
        values = [parse_proto(value) for value in parse_proto(fields[5][0])[1]]
        event["scalars"] = {
            v[1][0].decode(): struct.unpack("<f", v[2][0])[0] for v in values if 2 in v
        }
    return event


def test_crc32c_standard_vector_and_bitwise_reference():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = np.random.default_rng(0).bytes(1000)
    for end in (1, 7, 64, 1000):
        assert crc32c(data[:end]) == crc32c_bitwise(data[:end])


def test_tensorboard_event_file_decodes_to_written_scalars(tmp_path):
    writer = MetricWriter(str(tmp_path), jsonl=False, console=False)
    writer.write(0, {"reward/mean": jnp.float32(0.25), "loss/policy": np.float64(-1.5)})
    writer.write(2**40, {"reward/mean": 0.1, "count": np.int32(7), "lr": jnp.bfloat16(3e-4)})
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    # Flushed: readable before close, as after a kill.
    events = [decode_event(record) for record in read_tfrecords(path)]
    writer.close()

    assert events[0]["file_version"] == "brain.Event:2"
    assert "scalars" not in events[0]
    assert [e["step"] for e in events[1:]] == [0, 2**40]
    assert events[1]["scalars"] == {"reward/mean": 0.25, "loss/policy": -1.5}
    assert events[2]["scalars"] == {
        "reward/mean": float(np.float32(0.1)),
        "count": 7.0,
        "lr": float(np.float32(jnp.bfloat16(3e-4))),
    }
    assert events[1]["wall_time"] <= events[2]["wall_time"]


def test_tensorboard_event_accumulator_reads_the_file(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    with MetricWriter(str(tmp_path), jsonl=False, console=False) as writer:
        for step in range(3):
            writer.write(step, {"reward/mean": step / 4, "kl": 0.5 - step})
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["kl", "reward/mean"]
    assert [(e.step, e.value) for e in accumulator.Scalars("reward/mean")] == [
        (0, 0.0),
        (1, 0.25),
        (2, 0.5),
    ]


def test_jsonl_appends_across_resume_and_drops_a_partial_line(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False, console=False) as writer:
        writer.write(1, {"reward/mean": jnp.asarray(0.5), "n": np.int64(3)})
        writer.write(2, {"reward/mean": 0.75, "ok": np.bool_(True)})
    jsonl = tmp_path / "metrics.jsonl"
    with open(jsonl, "a") as f:
        f.write('{"step": 3, "rew')  # a write cut short by a kill
    with MetricWriter(str(tmp_path), tensorboard=False, console=False) as writer:
        writer.write(3, {"reward/mean": float("nan")})

    records = read_jsonl(str(jsonl))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["reward/mean"] == 0.5 and records[0]["n"] == 3
    assert isinstance(records[0]["n"], int) and records[1]["ok"] == 1
    assert math.isnan(records[2]["reward/mean"])
    assert all(isinstance(r["time"], float) for r in records)
    assert len(jsonl.read_text().splitlines()) == 3


def test_non_scalar_metric_is_rejected(tmp_path):
    with (
        MetricWriter(str(tmp_path), tensorboard=False, console=False) as writer,
        pytest.raises(ValueError, match="'x' must be a scalar"),
    ):
        writer.write(0, {"x": np.zeros(2)})


def test_console_line_rate_and_eta():
    stream = io.StringIO()
    console = ConsoleWriter(total_steps=100, keys=("reward/mean", "kl"), stream=stream)
    console.write(10, {"reward/mean": 0.123456, "other": 1.0}, wall_time=1000.0)
    console.write(20, {"reward/mean": 0.5, "kl": 0.01}, wall_time=1004.0)  # 2.5 steps/s
    first, second = stream.getvalue().splitlines()
    assert first == "step 10/100 | reward/mean 0.1235"
    # 80 steps left at 2.5 steps/s: 32 s.
    assert second == "step 20/100 | reward/mean 0.5 | kl 0.01 | 2.5 steps/s | ETA 0m32s"


def test_console_through_metric_writer(tmp_path, capsys):
    with MetricWriter(str(tmp_path), tensorboard=False, jsonl=False, total_steps=7) as writer:
        writer.write(3, {"loss/policy": jnp.float32(-0.25)})
    assert capsys.readouterr().out == "step 3/7 | loss/policy -0.25\n"


def test_wandb_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for step in (1, 2):  # a run, then its resume
        with MetricWriter(
            str(tmp_path),
            tensorboard=False,
            jsonl=False,
            console=False,
            wandb_project="deltal",
            config={"alpha": 0.5},
        ) as writer:
            writer.write(step, {"kl": np.float32(0.5)})

    (_, first), (_, second) = [c for c in calls if c[0] == "init"]
    assert first["project"] == "deltal" and first["config"] == {"alpha": 0.5}
    assert first["id"] == second["id"] and first["resume"] == "allow"
    assert [c for c in calls if c[0] != "init"] == [
        ("log", {"kl": 0.5}, 1),
        ("finish",),
        ("log", {"kl": 0.5}, 2),
        ("finish",),
    ]


def test_importing_metrics_does_not_import_wandb_or_matplotlib():
    code = (
        "import json, sys, deltal_jax.metrics; "
        "print(json.dumps([m for m in ('wandb', 'matplotlib', 'numpy') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["numpy"]  # numpy shows the check sees imports


def test_plot_curves_writes_a_png_of_the_present_keys(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    with MetricWriter(str(tmp_path), tensorboard=False, console=False) as writer:
        for step in range(20):
            writer.write(step, {"reward/mean": step / 20, "loss/policy": -step / 10})
            if step % 5 == 0:
                writer.write(step, {"eval/accuracy": step / 40})
    png = tmp_path / "curves.png"
    plotted = plot_curves(str(jsonl), str(png), keys=("eval/accuracy", "reward/mean", "absent"))
    assert plotted == ["eval/accuracy", "reward/mean"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    width, height = struct.unpack(">II", data[16:24])  # IHDR: a 1 x 2 grid of 4 x 3 in
    assert (width, height) == (800, 300)

    assert plot_curves(str(jsonl), str(tmp_path / "none.png"), keys=("absent",)) == []
    assert not os.path.exists(tmp_path / "none.png")


def test_curves_keep_the_last_value_of_a_rewritten_step():
    records = [
        {"step": 1, "kl": 1.0},
        {"step": 2, "kl": 2.0},
        {"step": 3, "kl": 3.0},
        {"step": 2, "kl": 20.0},  # resumed from step 1's checkpoint
        {"step": 3, "other": 0.0},
    ]
    assert metrics._curves(records, "kl") == ([1, 2, 3], [1.0, 20.0, 3.0])
