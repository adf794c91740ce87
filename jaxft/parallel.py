"""Device meshes and the one table that maps logical axis names to mesh axes.

Modules name the axes of their parameters (`embed`, `mlp`, `heads`, ...); this file alone decides how
those names land on the mesh `(data, fsdp, tensor, expert)`:

    batch → (data, fsdp)   embed → fsdp   heads/kv_heads/mlp/vocab → tensor   expert → expert

A dimension whose size is not divisible by its mesh axes is replicated instead (a tiny model on a big
mesh still runs), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "head_dim": (),
    "qkv": (),
    "position": (),
    "token_type": (),
    "classes": (),
    "length": (),
}


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Resolve one `-1` entry to "the rest of the devices" and check the product equals `n_devices`."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh: {n_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {n_devices} are "
                         f"available (set one axis to -1 to take the rest)")
    return sizes


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes or {"data": -1}, len(devices))
    grid = np.array(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array whose dimensions carry the logical names `axes`."""
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape):
        if name is None:
            out.append(None)
            continue
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} has no entry in jaxft.parallel.RULES")
        mesh_axes = tuple(a for a in RULES[name] if mesh.shape[a] > 1 and a not in used)
        if not mesh_axes or size % math.prod(mesh.shape[a] for a in mesh_axes):
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, shape, mesh))


def place(value: np.ndarray, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Put a host array on the devices, already sharded: each device receives only its slice."""
    if mesh is None:
        return jax.device_put(value)
    s = sharding(axes, value.shape, mesh)
    return jax.make_array_from_callback(value.shape, s, lambda idx: value[idx])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches are split over `(data, fsdp)` on their leading axis."""
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in RULES["batch"])
