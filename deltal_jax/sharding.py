"""Device mesh and partition rules.

The mesh has three axes:

- `data`: pure data parallelism (parameters replicated),
- `fsdp`: data parallelism with parameters, gradients and optimiser state sharded (ZeRO-3);
  weights are all-gathered layer by layer inside the scanned forward/backward,
- `tensor`: Megatron-style model parallelism (heads, MLP width and vocab split).

Parameters get their PartitionSpec from the first regex in `PARAM_RULES` that matches their
path (`layers/attn/q_proj/kernel`); activations are annotated with logical axis names that
`LOGICAL_RULES` maps onto mesh axes. A dimension that a mesh axis does not divide is left
replicated rather than padded, so every preset runs on every mesh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# Patterns are searched in the full path, so optimiser state (`mu/layers/.../kernel`) is
# sharded like the parameter it belongs to. Stacked layer parameters carry a leading [L]
# axis, hence the `None` first.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embed/embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"layers/attn/[qkv]_proj/kernel$", P(None, "fsdp", "tensor")),  # [L, D, n·Dh]
    (r"layers/attn/[qkv]_proj/bias$", P(None, "tensor")),  # [L, n·Dh]
    (r"layers/attn/o_proj/kernel$", P(None, "tensor", "fsdp")),  # [L, H·Dh, D]
    (r"layers/mlp/(gate|up)_proj/kernel$", P(None, "fsdp", "tensor")),  # [L, D, F]
    (r"layers/mlp/down_proj/kernel$", P(None, "tensor", "fsdp")),  # [L, F, D]
    (r".*", P()),  # norms, step counters: small, replicated
)

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH,
    "embed": None,  # the residual stream stays whole on each device
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    *,
    dcn_shape: Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (`data`, `fsdp`, `tensor`) mesh over all (global) devices.

    `shape` is the per-slice (ICI) shape; one entry may be -1 to take the remaining devices.
    For multi-slice / multi-host-group runs give `dcn_shape`, the number of slices along each
    axis (usually `(num_slices, 1, 1)`), so the slow network carries only data parallelism.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(dcn_shape or (1, 1, 1))
    shape = list(shape)
    if len(shape) != 3 or len(dcn) != 3:
        raise ValueError(f"mesh shape {shape} / dcn_shape {dcn} must have 3 entries {MESH_AXES}")
    per_slice = len(devices) // math.prod(dcn)
    if shape.count(-1) == 1:
        shape[shape.index(-1)] = per_slice // -math.prod(shape)
    if math.prod(shape) != per_slice:
        raise ValueError(
            f"mesh shape {tuple(shape)} × dcn_shape {dcn} does not use the {len(devices)} devices"
        )
    if dcn_shape is None:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        # TPU devices know their slice; on GPU hosts each process is one DCN granule.
        by_process = not hasattr(devices[0], "slice_index")
        grid = mesh_utils.create_hybrid_device_mesh(
            shape, dcn, devices, process_is_granule=by_process
        )
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _fit(spec: Sequence, shape: Sequence[int], axis_sizes: dict[str, int]) -> P:
    """Drops mesh axes from dimensions they do not divide (those stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fitted.append(axes if dim % math.prod(axis_sizes[a] for a in names) == 0 else None)
    return P(*fitted)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh | None = None) -> P:
    """PartitionSpec of the parameter at `path` (first matching rule), fitted to `mesh`."""
    spec = next(spec for pattern, spec in PARAM_RULES if re.search(pattern, path))
    return _fit(spec, shape, dict(mesh.shape)) if mesh is not None else spec


def _path_str(path: tuple) -> str:
    """ "layers/attn/q_proj/kernel" from a pytree path (the Variable's own `.value` node,
    a GetAttrKey, is not part of the name)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_shardings(tree, mesh: Mesh):
    """A NamedSharding for every array (or ShapeDtypeStruct) of a pytree: an NNX state, or
    an optax state holding per-parameter statistics, named by their dict keys."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_path_str(path), np.shape(x), mesh)), tree
    )


def logical_spec(names: Sequence[str | None]) -> P:
    """PartitionSpec for logical axis names, e.g. ("batch", None, "vocab")."""
    return P(*(LOGICAL_RULES[n] if n is not None else None for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Annotates an activation with its logical sharding, when a mesh is set
    (`with jax.set_mesh(mesh):`); a no-op otherwise, so the model runs unsharded as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fit(logical_spec(names), x.shape, dict(mesh.shape)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh):
    """device_put every array of a pytree with its leading dimension over the data axes."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves an existing model's parameters onto the mesh in place; returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model
