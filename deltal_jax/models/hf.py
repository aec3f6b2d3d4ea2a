"""Hugging Face checkpoint import and export (`config.json` + `*.safetensors`).

Import builds the model abstractly (no allocation), then creates every parameter with
`jax.make_array_from_callback` at its target sharding: each device's shard is read straight
from the memory-mapped safetensors file, so no host device ever holds the whole model, or
even a whole tensor when it is sharded. Export writes the same layout back, one tensor at a
time, in shards of bounded size, so other tools can evaluate a trained policy.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors' numpy reader)
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from deltal_jax import sharding
from deltal_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from deltal_jax.models.transformer import Decoder

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Our parameter path → (HF tensor name, whether HF stores it transposed). `{i}` is the layer.
_LAYER_NAMES = {
    "layers/input_norm/scale": ("model.layers.{i}.input_layernorm.weight", False),
    "layers/post_attn_norm/scale": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "layers/mlp/gate_proj/kernel": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "layers/mlp/up_proj/kernel": ("model.layers.{i}.mlp.up_proj.weight", True),
    "layers/mlp/down_proj/kernel": ("model.layers.{i}.mlp.down_proj.weight", True),
    "layers/attn/o_proj/kernel": ("model.layers.{i}.self_attn.o_proj.weight", True),
    **{
        f"layers/attn/{p}_proj/kernel": (f"model.layers.{{i}}.self_attn.{p}_proj.weight", True)
        for p in "qkv"
    },
    **{
        f"layers/attn/{p}_proj/bias": (f"model.layers.{{i}}.self_attn.{p}_proj.bias", False)
        for p in "qkv"
    },
    **{
        f"layers/attn/{p}_norm/scale": (f"model.layers.{{i}}.self_attn.{p}_norm.weight", False)
        for p in "qk"
    },
}
_GLOBAL_NAMES = {
    "embed/embedding": ("model.embed_tokens.weight", False),
    "final_norm/scale": ("model.norm.weight", False),
    "lm_head/kernel": ("lm_head.weight", True),
}


def _hf_name(path: str) -> tuple[str, bool, bool]:
    """(HF name template, transposed, stacked over layers) for one of our parameter paths."""
    if path in _LAYER_NAMES:
        return (*_LAYER_NAMES[path], True)
    if path in _GLOBAL_NAMES:
        return (*_GLOBAL_NAMES[path], False)
    raise KeyError(f"no HF name for parameter {path!r}")


def _flat_params(state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
    for path, var in nnx.to_flat_state(state):
        yield "/".join(str(k) for k in path), var


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of an HF checkpoint directory; overrides e.g. dtype="bfloat16"."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}")
    with open(file) as f:
        return from_hf_config(json.load(f), **overrides)


class _SafetensorsReader:
    """Name → lazily sliceable tensor over one or several (index.json) safetensors files."""

    def __init__(self, path: str | os.PathLike, stack: contextlib.ExitStack):
        from safetensors import safe_open

        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"neither {SINGLE_FILE} nor {INDEX_FILE} in {path!r}")
        self._tensors = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file!r} listed in {INDEX_FILE} does not exist")
            handle = stack.enter_context(safe_open(file, framework="numpy"))
            self._tensors.update(dict.fromkeys(handle.keys(), handle))

    def slice(self, name: str):
        if name not in self._tensors:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        return self._tensors[name].get_slice(name)


def _read_callback(reader: _SafetensorsReader, path: str, var: nnx.Variable, dtype):
    """The make_array_from_callback callback for one parameter: index → numpy shard."""
    template, transposed, stacked = _hf_name(path)
    num_layers = var.shape[0] if stacked else 1
    names = [template.format(i=i) for i in range(num_layers)]
    per_layer_shape = tuple(var.shape[1:] if stacked else var.shape)
    expected = per_layer_shape[::-1] if transposed else per_layer_shape
    for name in names:
        got = tuple(reader.slice(name).get_shape())
        if got != expected:
            raise ValueError(f"tensor {name!r} has shape {got}, the config implies {expected}")

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        if transposed:
            return reader.slice(name)[index[::-1]].T
        return reader.slice(name)[index]

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return read(names[0], index).astype(dtype)
        layers = range(num_layers)[index[0]]
        return np.stack([read(names[i], index[1:]) for i in layers]).astype(dtype)

    return callback


def load_model(
    path: str | os.PathLike, *, mesh: Mesh | None = None, **overrides
) -> tuple[Decoder, ModelConfig]:
    """Loads an HF checkpoint directory into a Decoder, parameters placed on `mesh` by the
    rules of `deltal_jax.sharding` (on the default device when mesh is None)."""
    cfg = load_config(path, **overrides)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = sharding.param_shardings(state, mesh)
    else:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    flat_shardings = dict(_flat_params(shardings))
    with contextlib.ExitStack() as stack:
        reader = _SafetensorsReader(path, stack)
        for name, var in _flat_params(state):
            dtype = np.dtype(cfg.param_dtype)
            callback = _read_callback(reader, name, var, dtype)
            target = flat_shardings[name]
            target = target.get_value() if isinstance(target, nnx.Variable) else target
            var.set_value(jax.make_array_from_callback(var.shape, target, callback))
    return nnx.merge(graphdef, state), cfg


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: Decoder, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every tensor, one at a time."""
    for path, var in _flat_params(nnx.state(model, nnx.Param)):
        template, transposed, stacked = _hf_name(path)
        value = var[...]
        for i in range(value.shape[0]) if stacked else [None]:
            x = _to_host(value[i] if stacked else value).astype(dtype)
            yield template.format(i=i), np.ascontiguousarray(x.T if transposed else x)


def save_model(
    model: Decoder,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> None:
    """Writes `model` as an HF checkpoint: config.json plus model.safetensors, or
    model-0000i-of-0000n.safetensors with model.safetensors.index.json beyond
    `max_shard_bytes`. `dtype` (default: the parameter dtype) is the stored dtype."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    dtype = np.dtype(dtype or cfg.param_dtype)
    if jax.process_index() != 0:  # every process joins the all-gathers, one writes
        for _ in _hf_tensors(model, dtype):
            pass
        return
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(to_hf_config(cfg, torch_dtype=dtype.name), f, indent=2)

    pending: dict[str, np.ndarray] = {}  # the shard being filled
    names: list[list[str]] = [[]]  # tensor names per shard
    files: list[str] = []
    total = shard_bytes = 0

    def flush() -> None:  # written under a temporary name: the total count is not known yet
        files.append(os.path.join(path, f"shard-{len(files)}.tmp"))
        save_file(pending, files[-1], metadata={"format": "pt"})
        pending.clear()

    for name, x in _hf_tensors(model, dtype):
        if pending and shard_bytes + x.nbytes > max_shard_bytes:
            flush()
            names.append([])
            shard_bytes = 0
        pending[name] = x
        names[-1].append(name)
        shard_bytes += x.nbytes
        total += x.nbytes
    flush()

    if len(files) == 1:
        os.replace(files[0], os.path.join(path, SINGLE_FILE))
        return
    weight_map = {}
    for k, (file, shard_names) in enumerate(zip(files, names, strict=True)):
        final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(file, os.path.join(path, final))
        weight_map.update(dict.fromkeys(shard_names, final))
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
