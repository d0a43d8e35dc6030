"""AOT compilation for a TPU topology on this CPU host (needs libtpu; skipped without it), and for
an 8-GPU host (needs the CUDA PJRT plugin: `make test` puts it in .venv/gpu_aot)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("libtpu")

from diffrestorer_jax.parallel import topology  # noqa: E402
from diffrestorer_jax.tools import aot  # noqa: E402
from mini_config import mini_tiny  # noqa: E402


def _installed(module: str) -> bool:
    """Whether `module` can be imported (find_spec raises, not returns None, when a parent is missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_topology_names():
    s = topology.tpu_spec("v5e-256")
    assert (s.chips, s.topology_name, s.chip_config_name) == (256, "v5e:16x16", "default")
    s = topology.tpu_spec("v4-32")
    assert (s.chips, s.topology_name, s.chip_config_name) == (16, "v4:2x2x4", "megacore")
    assert topology.tpu_spec("v5p-128").topology_name == "v5p:4x4x4"
    assert topology.tpu_spec("v6e-256").generation.hbm_bytes == 32 * topology.GiB
    with pytest.raises(ValueError, match="unknown TPU topology"):
        topology.tpu_spec("v9-8")
    with pytest.raises(ValueError, match="slice shape"):
        topology.tpu_spec("v5e-3")


def _mini_tiny():
    """configs/tiny.py's stage 1, one level shallower (tests/mini_config.py), 32 px, FSDP mesh."""
    c = mini_tiny("stage1")
    c.image_size = 32
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.train.batch_size = 4
    return c


def test_tiny_stage1_compiles_for_v5e_2x2():
    """A tiny stage-1 step (paired LQ: the degradation pipeline alone triples the compile time)
    compiled for 4 v5e chips with the FSDP mesh; the memory report is sane."""
    c = _mini_tiny()
    devices = topology.topology_devices("v5e-4")
    assert len(devices) == 4 and "v5" in devices[0].device_kind.lower()
    r = aot.compile_train_step(c, devices, paired=True, count_model_flops=False,
                               compiler_options={"exec_time_optimization_effort": -1.0})
    m = r["memory"]
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # trained params + 2 Adam moments + EMA + frozen params of the tiny model: a few MB per chip
    assert 100_000 < m["argument"] < 64 * 2 ** 20, m
    assert m["alias"] > 0, "the donated train state should alias the output"
    assert 0 < m["total"] < topology.GENERATIONS["v5e"].hbm_bytes
    assert r["xla_flops_per_chip"] > 1e6
    text = aot.format_report(r, topology.GENERATIONS["v5e"])
    assert "FITS" in text and "per chip" in text


def test_model_flops_count_the_global_work_once():
    """The model-FLOPs column: the train count is the global batch's (twice the images, twice the
    FLOPs; remat recompute and the attention implementation do not change it), and restore's
    per-step forward is a fraction of a train step's forward + backward per image."""
    c = _mini_tiny()
    c.train.batch_size = 2
    two = aot.model_flops_train(c, paired=True)
    c.train.batch_size = 4
    c.model.remat_policy = "full"
    c.model.attention_impl = "pallas_tpu"  # a kernel call would hide its FLOPs: counted as XLA dots
    c.mesh.data, c.mesh.fsdp = -1, 64  # a pod config's mesh: the count runs on one CPU device all the same
    four = aot.model_flops_train(c, paired=True)
    assert two > 1e6 and four == pytest.approx(2 * two, rel=0.01)
    r = aot.model_flops_restore(c, batch=4, steps=3)
    assert r["per_image_once"] > 1e6 and r["per_step"] > 1e6
    assert r["total"] == pytest.approx(4 * (r["per_image_once"] + 3 * r["per_step"]))
    assert 1.5 < (two / 2) / r["per_step"] < 5, (two, r)


def test_gpu_cards_as_target_configs():
    """h100x8 / h200x8 name a card of the table and a GPU count; the card renders as XLA's
    GpuTargetConfigProto text (sm_90, 132 SMs, its memory)."""
    card, count = topology.gpu_spec("h100x8")
    assert (card.name, count) == ("h100", 8) and topology.is_gpu("H200x8") and not topology.is_gpu("v5e-8")
    text = card.target_config()
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text and "core_count: 132" in text
    assert f"device_memory_size: {81559 * 2 ** 20}" in text and 'platform_name: "CUDA"' in text
    assert topology.accelerator("h200x8").hbm_bytes > topology.accelerator("h100x8").hbm_bytes
    assert topology.accelerator("v5e-256") is topology.GENERATIONS["v5e"]


@pytest.mark.skipif(not _installed("jax_plugins.xla_cuda12"),
                    reason="needs the CUDA PJRT plugin in this process (see the test below)")
def test_tiny_stage1_compiles_for_h100x8():
    c = _mini_tiny()
    c.model.attention_impl = "xla"
    c.train.batch_size = 8
    devices = topology.topology_devices("h100x8")
    assert len(devices) == 8 and "H100" in devices[0].device_kind
    r = aot.compile_train_step(c, devices, paired=True, count_model_flops=False, backend="gpu",
                               compiler_options=topology.GPU_AOT_OPTIONS)
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert 0 < r["memory"]["total"] < topology.accelerator("h100x8").hbm_bytes
    assert "FITS" in aot.format_report(r, topology.accelerator("h100x8"))


REPO = pathlib.Path(__file__).resolve().parents[2]
GPU_AOT = pathlib.Path(os.environ.get("DIFFRESTORER_GPU_AOT", REPO / ".venv" / "gpu_aot"))


@pytest.mark.skipif(_installed("jax_plugins.xla_cuda12"), reason="the plugin is in this process: "
                    "test_tiny_stage1_compiles_for_h100x8 runs here")
@pytest.mark.skipif(not (GPU_AOT / ".installed").exists(),
                    reason=f"needs the CUDA PJRT plugin in {GPU_AOT} (make gpu-aot)")
def test_gpu_compile_in_the_plugins_own_folder():
    """How the README says to compile for a GPU: the plugin's folder on PYTHONPATH and
    JAX_PLATFORMS=cpu, kept out of every other JAX process. Runs the H100 compile test above in such
    a process and asserts that it ran (passed, not skipped)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(GPU_AOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k",
         "test_tiny_stage1_compiles_for_h100x8", str(pathlib.Path(__file__))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "1 passed" in out and "skipped" not in out, out[-4000:]


@pytest.mark.parametrize("args, message", [
    (["--topology", "v5e-3"], "error: --topology v5e-3: v5e-3: 3 chips is not a v5e slice shape"),
    (["--topology", "v5e-4", "--batch", "6"], "error: cannot compile for v5e-4 (batch 6"),
])
def test_a_mistake_is_exit_2_not_does_not_fit(args, message):
    """diffrestorer-aot's exit status 1 means "does not fit" (a sweep reads it so): an unknown
    topology or a batch the chips cannot split is a one-line error and exit status 2 instead."""
    proc = subprocess.run([sys.executable, "-m", "diffrestorer_jax.cli.aot", "--config",
                           "configs/tiny.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
