"""TFDS builders: procedurally generated Countdown, local JSONL math problems, GSM8K.

All three are written and read in the `array_record` file format, which TFDS writes and
reads with numpy and `array_record` alone; the default `tfrecord` format needs
TensorFlow, which this project does not install. `as_data_source(split)` returns a
random-access source that `deltal_jax.data.pipeline` hands to grain. Text features come
back as `bytes`; the pipeline decodes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from deltal_jax.data.countdown import CountdownSpec, generate_split

FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class CountdownConfig(tfds.core.BuilderConfig):
    """Split sizes, seed and ranges of a generated Countdown dataset.

    TFDS caches a build under `<data_dir>/deltal_countdown/<name>/<version>`, so give
    every distinct configuration its own name.
    """

    spec: CountdownSpec = CountdownSpec()
    num_train: int = 20_000
    num_test: int = 1_000
    seed: int = 0


class DeltalCountdown(tfds.core.GeneratorBasedBuilder):
    """Countdown instances from `deltal_jax.data.countdown`; no downloads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        CountdownConfig(name="n3_4", description="3 or 4 numbers in [1, 20], targets ≤ 100."),
        CountdownConfig(
            name="n3", spec=CountdownSpec(num_numbers=(3,)), description="3 numbers in [1, 20]."
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Countdown: reach the target with + - * / using each number once.",
            features=tfds.features.FeaturesDict(
                {
                    "id": np.int64,
                    "numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "target": np.int32,
                    "solution": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # generated, nothing to download
        config = self.builder_config
        # Distinct seed streams; the hash split already keeps train and test disjoint.
        return {
            "train": self._generate_examples("train", config.num_train, config.seed),
            "test": self._generate_examples("test", config.num_test, config.seed + 1),
        }

    def _generate_examples(self, split: str, num_examples: int, seed: int) -> Iterator:
        for record in generate_split(split, num_examples, seed, self.builder_config.spec):
            yield record["id"], record


@dataclasses.dataclass(eq=False)
class MathJsonlConfig(tfds.core.BuilderConfig):
    """JSONL files of `{"question": ..., "answer": ...}` lines, by split name.

    Without `paths`, the builder reads `<split>.jsonl` for every such file in the manual
    directory (`download_config=tfds.download.DownloadConfig(manual_dir=...)`).
    """

    paths: Mapping[str, str] | None = None


class DeltalMathJsonl(tfds.core.GeneratorBasedBuilder):
    """Math problems with reference answers from local JSONL files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [MathJsonlConfig(name="manual")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place train.jsonl / test.jsonl (question, answer) here."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Math questions with reference answers from local JSONL files.",
            features=tfds.features.FeaturesDict(
                {"id": np.int64, "question": tfds.features.Text(), "answer": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        paths = self.builder_config.paths
        if paths is None:
            files = sorted(epath.Path(dl_manager.manual_dir).glob("*.jsonl"))
            paths = {os.path.basename(str(f)).removesuffix(".jsonl"): str(f) for f in files}
        if not paths:
            raise ValueError(
                f"no JSONL files: set MathJsonlConfig.paths or put <split>.jsonl files in "
                f"{dl_manager.manual_dir}"
            )
        return {split: self._generate_examples(path) for split, path in paths.items()}

    def _generate_examples(self, path: str) -> Iterator:
        for record in read_math_jsonl(path):
            yield record["id"], record


def read_math_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records `{"id", "question", "answer"}` from a JSONL file; `id` is the line index.

    Raises ValueError naming the file and line of a malformed line or missing field.
    """
    records = []
    with epath.Path(path).open() as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            missing = [
                k for k in ("question", "answer") if not isinstance(row, dict) or k not in row
            ]
            if missing:
                raise ValueError(
                    f"{path}:{line_number}: missing field(s) {missing}; each line needs "
                    '{"question": str, "answer": str}'
                )
            records.append(
                {
                    "id": line_number - 1,
                    "question": str(row["question"]),
                    "answer": str(row["answer"]),
                }
            )
    return records


def build(
    builder: tfds.core.DatasetBuilder, manual_dir: str | os.PathLike | None = None
) -> tfds.core.DatasetBuilder:
    """Prepares `builder` (no-op when already built) and returns it."""
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=download_config)
    return builder


def countdown_builder(
    data_dir: str | os.PathLike, config: str | CountdownConfig = "n3_4"
) -> DeltalCountdown:
    """A prepared Countdown builder in `data_dir` (array_record)."""
    return build(DeltalCountdown(config=config, data_dir=str(data_dir), file_format=FILE_FORMAT))


def math_jsonl_builder(
    data_dir: str | os.PathLike,
    *,
    paths: Mapping[str, str] | None = None,
    manual_dir: str | os.PathLike | None = None,
    name: str = "local",
) -> DeltalMathJsonl:
    """A prepared JSONL math builder, from explicit `paths` or `<split>.jsonl` in
    `manual_dir`. `name` keys the cache: use a new one for different files (the class's
    own config "manual" serves `tfds.builder("deltal_math_jsonl/manual")`)."""
    config = MathJsonlConfig(name=name, paths=dict(paths) if paths else None)
    builder = DeltalMathJsonl(config=config, data_dir=str(data_dir), file_format=FILE_FORMAT)
    return build(builder, manual_dir)


def gsm8k_builder(data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """GSM8K from the TFDS catalog (downloads from GitHub on first use)."""
    return build(tfds.builder("gsm8k", data_dir=data_dir, file_format=FILE_FORMAT))


def extract_gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after the last `####`, without
    thousands separators (`#### 1,200` → `1200`)."""
    return solution.rpartition("####")[2].strip().replace(",", "")
