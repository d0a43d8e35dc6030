"""Facts about accelerator slices, as data: per-chip memory and peak FLOP/s, and the topology
names libtpu wants (maxtext's accelerator table, our way). A leaf: nothing here compiles or runs.

    spec = tpu_spec("v5e-256")               # generation, chips, HBM, peak bf16 FLOP/s
    devices = topology_devices("v5e-256")    # abstract TPU devices for AOT compilation (libtpu)
"""
import dataclasses
import os
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    name: str
    hbm_bytes: int          # per chip
    peak_bf16_flops: float  # per chip, dense
    megacore: bool          # 2 TensorCores act as one device; the "-N" suffix counts cores
    dims: int               # torus dimensions of the topology name


# Public Cloud TPU figures (per chip).
GENERATIONS = {
    "v4": TpuGeneration("v4", 32 * GiB, 275e12, True, 3),
    "v5e": TpuGeneration("v5e", 16 * GiB, 197e12, False, 2),
    "v5p": TpuGeneration("v5p", 95 * GiB, 459e12, True, 3),
    "v6e": TpuGeneration("v6e", 32 * GiB, 918e12, False, 2),
}

# chips -> physical shape of one slice (the shapes Cloud TPU provisions).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
              4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    name: str               # e.g. "v5e-256"
    generation: TpuGeneration
    chips: int              # per slice
    topology_name: str      # e.g. "v5e:16x16"
    chip_config_name: str
    chips_per_host_bounds: tuple


def tpu_spec(name: str) -> TpuSpec:
    """'v5e-256' / 'v4-32' / 'v5p-128' / 'v6e-8' -> the topology description libtpu wants.

    The suffix counts TensorCores for v4/v5p (2 per chip, megacore) and chips for v5e/v6e, as in
    Cloud TPU accelerator types.
    """
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip().lower().replace("litepod", "e"))
    if not m:
        raise ValueError(f"unknown TPU topology {name!r}; use <gen>-<size> with gen in "
                         f"{sorted(GENERATIONS)}, e.g. v5e-256, v4-32, v5p-128, v6e-256")
    gen = GENERATIONS[m.group(1)]
    size = int(m.group(2))
    chips = size // 2 if gen.megacore else size
    shapes = _SHAPES_3D if gen.dims == 3 else _SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"{name}: {chips} chips is not a {gen.name} slice shape we know "
                         f"(chips: {sorted(shapes)})")
    shape = shapes[chips]
    topo = f"{gen.name}:" + "x".join(map(str, shape))
    host = (2, 2, 1) if chips >= 4 else (1, 1, 1)
    return TpuSpec(name, gen, chips, topo, "megacore" if gen.megacore else "default", host)


def topology_devices(name: str, num_slices: int = 1):
    """Abstract TPU devices of `num_slices` slices of topology `name` (needs libtpu, no TPU)."""
    from jax.experimental import topologies
    # Compiling needs no TPU, so several compiles (tests, other users) may share the host: skip
    # libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    spec = tpu_spec(name)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology_name,
                                        chip_config_name=spec.chip_config_name,
                                        chips_per_host_bounds=spec.chips_per_host_bounds,
                                        num_slices=num_slices)
    return list(desc.devices)
