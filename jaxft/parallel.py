"""Device meshes, the one table that maps logical axis names to mesh axes, and multi-host start-up.

Modules name the axes of their parameters and activations (`embed`, `mlp`, `heads`, ...); this file
alone decides how those names land on the mesh `(data, fsdp, tensor, expert)`:

    batch → (data, fsdp)    embed, q_lora, kv_lora → fsdp    heads/kv_heads/mlp/vocab → tensor
    expert → expert         length → sequence

so parameters and optimizer state are FSDP-sharded over `fsdp` (each weight along its model-width or
latent dimension), attention heads and MLP width are split over `tensor`, MoE experts over `expert`,
batches over `(data, fsdp)`, and with a `sequence` axis (long-context fine-tuning) every activation along
its token axis: each device holds T/sequence tokens of its rows, and attention gathers the keys and
values of the whole row (`jaxft.models.attention.attention`). A dimension whose size is not divisible by its mesh axes is replicated
instead (a tiny model on a big mesh still runs), and a mesh axis is used at most once per array, in
the order of the array's dimensions (an activation `('batch', 'length', 'embed')` shards its batch over
`fsdp` and leaves `embed` whole).

Activations are pinned where XLA's propagation needs help with `constrain(x, axes)`, which is a no-op
unless a mesh is active (`with activate(mesh):`, which the train and eval steps do while tracing), so
model code runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import sys
import threading
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("jaxft")

# Ordered by increasing communication intensity (what `mesh_utils.create_device_mesh` expects), so the
# most chatty axes land on the closest devices of a TPU torus.
MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "q_lora": ("fsdp",),
    "kv_lora": ("fsdp",),
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
    "length": ("sequence",),
    "layers": (),          # the stacked layer axis of `model.scan_layers`: every device holds every layer
    "lora_rank": (),       # a LoRA adapter's rank: A keeps the base's input axes, B its output axes
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
            raise ValueError(f"mesh {_show(sizes)}: {n_devices} devices are not divisible by the product "
                             f"of the fixed axes ({fixed})")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {_show(sizes)} needs {math.prod(sizes.values())} devices, but {n_devices} are "
                         f"available (set one axis to -1 to take the rest)")
    return sizes


def _show(sizes: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{a}: {s}" for a, s in sizes.items() if s != 1) + "}"


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over all devices (of every process) with the sizes of `mesh.{data, fsdp, sequence, expert,
    tensor}`.

    Devices are laid out by `mesh_utils.create_device_mesh`, which follows the physical topology on
    TPU (tensor-parallel neighbours on the fastest links) and keeps device order elsewhere.
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes or {"data": -1}, len(devices))
    grid = mesh_utils.create_device_mesh([shape[a] for a in MESH_AXES], devices)
    return Mesh(grid, MESH_AXES)


def spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh) -> P:
    """PartitionSpec for an array whose dimensions carry the logical names `axes` (None: replicated).

    `mesh` may be a `Mesh` or a `jax.sharding.AbstractMesh` (a described mesh, for planning).
    """
    if axes is None:
        return P()
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


def shard_factor(pspec: P, mesh) -> int:
    """Into how many pieces a PartitionSpec cuts an array on `mesh` (1 = replicated)."""
    n = 1
    for entry in pspec:
        for a in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= mesh.shape[a]
    return n


def sharding(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(value: np.ndarray, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Put a host array on the devices, already sharded: each device receives only its slice."""
    if mesh is None:
        return jax.device_put(value)
    s = sharding(axes, value.shape, mesh)
    return jax.make_array_from_callback(value.shape, s, lambda idx: value[idx])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches are split over `(data, fsdp)` on their leading axis and, for `[B, T]` token arrays, over
    `sequence` on their second (a mesh without a `sequence` axis leaves it whole)."""
    length = RULES["length"] if ndim >= 2 and all(mesh.shape[a] > 1 for a in RULES["length"]) else None
    return NamedSharding(mesh, P(RULES["batch"], *([length] + [None] * (ndim - 2))[:ndim - 1]))


def sequence_parallel_size(mesh) -> int:
    return math.prod(mesh.shape[a] for a in RULES["length"])


def data_parallel_size(mesh) -> int:
    return math.prod(mesh.shape[a] for a in RULES["batch"])


def mesh_of(arrays) -> Mesh | None:
    """The mesh the arrays of a pytree are placed on (the first `NamedSharding` found), else None."""
    for x in jax.tree.leaves(arrays):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxft_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh | None):
    """Make `constrain` pin activations to `mesh` while the body runs (wrap tracing in it)."""
    token = _ACTIVE.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh `activate` set for the trace in progress (None outside, or on a single device)."""
    mesh = _ACTIVE.get()
    return mesh if mesh is not None and mesh.size > 1 else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` of an activation by its logical axes, e.g. `('batch', 'length', 'embed')`.

    No-op without an active mesh of more than one device.
    """
    mesh = _ACTIVE.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, sharding(axes, x.shape, mesh))


# ---------------------------------------------------------------------------------------------------
# multi-host


JOIN_TIMEOUT_EXIT_CODE = 4


def initialize_from_config(mesh_cfg) -> bool:
    """`initialize_distributed` with the `mesh.{distributed, coordinator, num_processes, process_id,
    init_timeout}` settings of a config (`jaxft.config.MeshSection`)."""
    return initialize_distributed(mesh_cfg.distributed, mesh_cfg.coordinator, mesh_cfg.num_processes,
                                  mesh_cfg.process_id, mesh_cfg.init_timeout)


def initialize_distributed(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Join the processes of a multi-host run into one JAX runtime (`jax.distributed.initialize`).

    Call it before anything touches JAX devices. `mode` (`mesh.distributed`):

    - `off`: single process;
    - `on`: always initialise; what is not given is auto-detected by JAX (TPU pod slices, SLURM, Open MPI,
      Kubernetes), so `mesh.distributed=on` alone is the whole setting on a TPU pod;
    - `auto` (default): initialise when a coordinator is known (`coordinator`, or the environment variable
      `JAXFT_COORDINATOR` / `JAX_COORDINATOR_ADDRESS`) or the process runs as one task of several under
      SLURM or Open MPI; else stay single-process.

    `num_processes` and `process_id` fall back to `JAXFT_NUM_PROCESSES` / `JAXFT_PROCESS_ID`. Returns True
    when this process is part of a multi-process runtime.

    If not every process joins within `timeout_s` seconds, the process prints why and exits with
    `JOIN_TIMEOUT_EXIT_CODE` (4) instead of hanging (JAX itself would abort a little later with a bare
    `DEADLINE_EXCEEDED`).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mesh.distributed={mode!r}: use auto, on or off")
    if mode == "off":
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    env = os.environ
    coordinator = coordinator or env.get("JAXFT_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAXFT_NUM_PROCESSES"):
        num_processes = int(env["JAXFT_NUM_PROCESSES"])
    if process_id is None and env.get("JAXFT_PROCESS_ID"):
        process_id = int(env["JAXFT_PROCESS_ID"])
    scheduler = int(env.get("SLURM_NTASKS", "1")) > 1 or "OMPI_MCA_orte_hnp_uri" in env
    if mode == "auto" and coordinator is None and not scheduler:
        return False
    where = (f"coordinator {coordinator or '(auto-detected)'}, process "
             f"{'(auto)' if process_id is None else process_id} of {num_processes or '(auto)'}")
    log.info("joining the distributed runtime (%s); waiting up to %d s for every process", where, timeout_s)

    def give_up() -> None:
        sys.stderr.write(
            f"jaxft: not every process of the multi-host run joined within {timeout_s} s ({where}). Start the "
            f"same command on every host at once, with the same coordinator and process count and distinct "
            f"process ids (tpu/launch.sh does this on TPU VMs); mesh.init_timeout sets the wait.\n")
        sys.stderr.flush()
        os._exit(JOIN_TIMEOUT_EXIT_CODE)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s + 30)
    finally:
        watchdog.cancel()
    log.info("process %d of %d: %d local device(s), %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1
