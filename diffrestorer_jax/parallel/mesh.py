"""Device mesh construction and multi-host start-up.

The mesh has three named axes, always in this order:
  'data'    pure data parallelism: each slice holds a full copy of whatever is not fsdp-sharded;
  'fsdp'    data parallelism whose members also split the big weights and optimizer state (ZeRO-3);
  'tensor'  model parallelism inside a layer (wide 'mlp'/'heads' dims), for models that outgrow fsdp.
Sizes come from a ConfigDict (`data`, `fsdp`, `tensor`, -1 = "whatever is left"), so a run can move
between a laptop, a GPU node and a TPU pod by changing the config, not the code. Multi-slice runs add
`dcn_data` / `dcn_fsdp`: the part of each axis that crosses the slow data-centre network, which
`create_hybrid_device_mesh` places outermost so that only cheap gradient all-reduces cross it.
"""
import logging
import math
import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
FORCE_ENV = "DIFFRESTORER_DISTRIBUTED"  # "1": this is a multi-host run (launch/train_tpu_pod.sh sets it)


class DistributedInitError(RuntimeError):
    """A multi-process start was asked for, but `jax.distributed.initialize` found no cluster."""


def _get(cfg, key, default):
    """Read `key` from a ConfigDict or a plain mapping."""
    try:
        value = cfg[key]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if value is None else value


def resolve_axis_sizes(sizes: Sequence[int], total: int, what: str = "devices") -> tuple:
    """Replace a single -1 by the size that makes the product equal `total`; check the product.

    Raises a ValueError naming the sizes and the device count, because a wrong mesh otherwise shows up
    as an obscure reshape error deep inside mesh_utils.
    """
    sizes = [int(s) for s in sizes]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive (or -1)")
    if fill:
        if total % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: {total} {what} are not "
                             f"divisible by {known}, so -1 cannot fill the rest")
        sizes[fill[0]] = total // known
    if math.prod(sizes) != total:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
                         f"but there are {total} {what}; change the config's mesh sizes")
    return tuple(sizes)


def make_mesh(mesh_config: Optional[Mapping] = None, devices: Optional[Sequence] = None) -> Mesh:
    """Build a ('data', 'fsdp', 'tensor') Mesh from config sizes over `devices` (default: all).

    With `dcn_data` or `dcn_fsdp` > 1 the ICI sizes are per slice and the hybrid mesh multiplies them
    by the DCN sizes; otherwise mesh_utils picks a device order that keeps each axis on fast links.
    """
    cfg = mesh_config if mesh_config is not None else {}
    devices = list(devices) if devices is not None else jax.devices()
    dcn = (int(_get(cfg, "dcn_data", 1)), int(_get(cfg, "dcn_fsdp", 1)), 1)
    ici_raw = [_get(cfg, "data", 1), _get(cfg, "fsdp", -1), _get(cfg, "tensor", 1)]
    num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices cannot be split into dcn_data*dcn_fsdp = "
                         f"{num_slices} slices")
    ici = resolve_axis_sizes(ici_raw, len(devices) // num_slices, "devices per slice")
    if num_slices > 1:
        grid = _hybrid_grid(ici, dcn, devices)
    else:
        grid = _device_grid(ici, devices)
    logging.info("mesh %s over %d devices", dict(zip(MESH_AXES, np.shape(grid))), len(devices))
    return Mesh(grid, MESH_AXES)


def _device_grid(shape, devices):
    """mesh_utils' topology-aware order where it knows the hardware; a plain reshape otherwise
    (fake CPU devices, a subset of devices)."""
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices, dtype=object).reshape(shape)


def _hybrid_grid(ici, dcn, devices):
    """Slices are TPU slices when devices know their slice, else processes (GPU hosts); a single
    process with fake devices (CPU tests) gets the same layout by a dcn-major reshape."""
    if hasattr(devices[0], "slice_index"):
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    if len({d.process_index for d in devices}) == math.prod(dcn):
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True,
                                                    allow_split_physical_axes=True)
    logging.warning("no slice or process granules for dcn sizes %s; splitting devices in order", dcn)
    grid = np.asarray(devices, dtype=object).reshape(tuple(dcn) + tuple(ici))
    grid = grid.transpose(0, 3, 1, 4, 2, 5)  # (dcn_i, ici_i) adjacent per axis: dcn is the outer part
    return grid.reshape(tuple(a * b for a, b in zip(dcn, ici)))


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None, force: Optional[bool] = None,
                                 **kwargs) -> bool:
    """Call `jax.distributed.initialize` when this is a multi-process launch; a no-op otherwise.

    A launch is multi-process when explicit arguments say so, when the coordinator env vars are set
    (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID), or when a cluster JAX knows how to
    detect is present (SLURM with several tasks, TPU_WORKER_HOSTNAMES listing several workers), or when
    `force` is set (default: env DIFFRESTORER_DISTRIBUTED=1). A GCE TPU VM lists its workers only in
    its metadata server, so there only the pod launch script knows the run is multi-host: it sets the
    variable and JAX detects the cluster (a single-host TPU VM becomes a job of one process). Where JAX
    finds no cluster this raises DistributedInitError; where processes are missing JAX ends this one
    after DIFFRESTORER_INIT_TIMEOUT_S (default 300 s). Must run before any other JAX call. Returns True
    when it initialised.
    """
    env = os.environ
    if force is None:
        force = env.get(FORCE_ENV, "0") not in ("", "0")
    coordinator_address = coordinator_address or next(
        (env[k] for k in _DISTRIBUTED_ENV if env.get(k)), None)
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None and (num_processes or 1) > 1
    detected = int(env.get("SLURM_NTASKS", "1")) > 1 or _tpu_pod_workers() > 1
    if not (explicit or detected or force):
        return False
    if env.get("DIFFRESTORER_HEARTBEAT_TIMEOUT_S"):
        # JAX declares a process dead after 100 s without a heartbeat; a starved host (tests on a
        # loaded machine) needs longer
        kwargs.setdefault("heartbeat_timeout_seconds", int(env["DIFFRESTORER_HEARTBEAT_TIMEOUT_S"]))
    if env.get("DIFFRESTORER_INIT_TIMEOUT_S"):
        kwargs.setdefault("initialization_timeout", int(env["DIFFRESTORER_INIT_TIMEOUT_S"]))
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        # CPU processes need a cross-process collectives backend (jax 0.10's default is gloo already).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
    except ValueError as e:  # JAX found no cluster: no coordinator, process count or id
        if not force:
            raise
        raise DistributedInitError(
            f"{FORCE_ENV} (or force=True) asks for a multi-host run, but jax.distributed.initialize() "
            f"found no cluster to join ({e}); unset it on a single machine, or give the cluster as "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID") from e
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process reaches `name` (a no-op in a single-process run).

    Uses the coordination service, not a device collective: the first collective over a device set
    builds its CPU (gloo) communicator, and that handshake gives up after 30 s. Processes that compile
    or restore at different speeds must therefore meet here before their first collective step.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination client `jax.distributed.initialize` made
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def _tpu_pod_workers() -> int:
    """Number of TPU VM workers from the env the TPU runtime sets (1 when not on a pod)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if any(" " in h for h in names):  # a runtime's warning text, not a host list
        return 1
    return max(1, len(names))
