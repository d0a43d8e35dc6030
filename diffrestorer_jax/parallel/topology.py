"""Facts about accelerator slices, as data: per-chip memory and peak FLOP/s, and the topology
names libtpu wants (maxtext's accelerator table, our way); NVIDIA cards as XLA GPU target configs.
A leaf: nothing here compiles or runs.

    spec = tpu_spec("v5e-256")               # generation, chips, HBM, peak bf16 FLOP/s
    devices = topology_devices("v5e-256")    # abstract TPU devices for AOT compilation (libtpu)
    devices = topology_devices("h100x8")     # abstract GPUs (the CUDA PJRT plugin, no GPU needed)
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


@dataclasses.dataclass(frozen=True)
class GpuCard:
    """One NVIDIA card: what the reports need (`name`, `hbm_bytes`, `peak_bf16_flops`, like a
    TpuGeneration) and XLA's GpuDeviceInfoProto fields, from public specifications (NVIDIA's data
    sheets and CUDA's per-architecture limits), laid out like XLA's xla/tools/hlo_opt/gpu_specs/."""
    name: str
    label: str
    hbm_bytes: int            # as the driver reports it (nvidia-smi's total memory)
    peak_bf16_flops: float    # dense tensor-core bf16, SXM boost clock
    compute_capability: tuple
    sm_count: int
    clock_ghz: float
    memory_bandwidth: int     # bytes/s
    l2_bytes: int
    shared_per_sm: int
    shared_per_block_optin: int
    fp32_per_sm: int = 128

    def target_config(self) -> str:
        """The card as a GpuTargetConfigProto in text form (what jax's CUDA plugin takes to compile
        for a GPU that is not there)."""
        major, minor = self.compute_capability
        return "\n".join([
            "gpu_device_info {",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  threads_per_block_limit: 1024", "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            f"  shared_memory_per_block_optin: {self.shared_per_block_optin}",
            f"  shared_memory_per_core: {self.shared_per_sm}", "  threads_per_core_limit: 2048",
            f"  core_count: {self.sm_count}", f"  fpus_per_core: {self.fp32_per_sm}",
            "  block_dim_limit_x: 2147483647", "  block_dim_limit_y: 65535", "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {self.memory_bandwidth}", f"  l2_cache_size: {self.l2_bytes}",
            f"  clock_rate_ghz: {self.clock_ghz}", f"  device_memory_size: {self.hbm_bytes}",
            "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            "dnn_version_info { major: 9 minor: 8 patch: 0 }",
            f'device_description_str: "{self.label}"',
        ]) + "\n"


MiB = 1024 ** 2
# H100 SXM5 80GB and H200 SXM 141GB: Hopper, sm_90, 132 SMs, 1.98 GHz boost, 50 MB L2, 228 KiB shared
# memory per SM (227 KiB per block opt-in), 989 TFLOP/s dense bf16; HBM3 3.35 TB/s (81,559 MiB as
# nvidia-smi reports it) and HBM3e 4.8 TB/s (143,771 MiB).
GPU_CARDS = {
    "h100": GpuCard("h100", "NVIDIA H100 80GB HBM3", 81559 * MiB, 989e12, (9, 0), 132, 1.98,
                    3_350_000_000_000, 50 * MiB, 228 * 1024, 227 * 1024),
    "h200": GpuCard("h200", "NVIDIA H200", 143771 * MiB, 989e12, (9, 0), 132, 1.98,
                    4_800_000_000_000, 50 * MiB, 228 * 1024, 227 * 1024),
}


# XLA options for compiling without the GPU: with no autotuner to pick them, the Triton GEMM tiler
# finds no tile sizes for some float32 dots at HIGHEST precision (jax.image.resize's), so GEMMs go to
# cuBLAS, as they would after autotuning rejected Triton for them.
GPU_AOT_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def gpu_spec(name: str):
    """'h100x8' -> (card, GPU count); None when `name` is not a GPU topology."""
    m = re.fullmatch(r"(h100|h200)x(\d+)", name.strip().lower())
    if not m:
        return None
    return GPU_CARDS[m.group(1)], int(m.group(2))


def is_gpu(name: str) -> bool:
    return gpu_spec(name) is not None


def accelerator(name: str):
    """The per-device facts the AOT report needs: a TpuGeneration or a GpuCard."""
    gpu = gpu_spec(name)
    return gpu[0] if gpu else tpu_spec(name).generation


def topology_devices(name: str, num_slices: int = 1):
    """Abstract devices of `num_slices` slices of topology `name`: TPU (needs libtpu) or, for
    'h100x8' / 'h200x8', one host's NVIDIA GPUs (needs the CUDA PJRT plugin, pip extra gpu_aot, and
    JAX_PLATFORMS=cpu); no accelerator needed either way."""
    from jax.experimental import topologies
    gpu = gpu_spec(name)
    if gpu:
        card, count = gpu
        if num_slices != 1:
            raise ValueError(f"{name}: one host of GPUs (num_slices=1)")
        try:
            desc = topologies.get_topology_desc(platform="cuda", target_config=card.target_config(),
                                                topology=f"1x1x{count}")
        except Exception as e:  # noqa: BLE001  the plugin missing shows up as assorted errors
            raise RuntimeError(f"{name}: compiling for NVIDIA GPUs without one needs the CUDA PJRT "
                               f"plugin (pip install -e .[gpu_aot], ideally in its own environment) "
                               f"and JAX_PLATFORMS=cpu ({type(e).__name__}: {e})") from None
        return list(desc.devices)
    # Compiling needs no TPU, so several compiles (tests, other users) may share the host: skip
    # libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    spec = tpu_spec(name)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology_name,
                                        chip_config_name=spec.chip_config_name,
                                        chips_per_host_bounds=spec.chips_per_host_bounds,
                                        num_slices=num_slices)
    return list(desc.devices)
