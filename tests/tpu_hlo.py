"""A function lowered for one TPU chip from this CPU host (libtpu's topology, no TPU needed), as
HLO text: the program a TPU would run, for tests that CPU-only routes leave TPU programs alone.

Not a test file. Skips the calling test when libtpu is not installed."""
import jax
import pytest


def hlo_for_tpu(fn, *args) -> str:
    """HLO text of jit(fn) lowered for a v5e chip, for arguments shaped like `args` (pytrees)."""
    pytest.importorskip("libtpu")
    from diffrestorer_jax.parallel import topology
    sharding = jax.sharding.SingleDeviceSharding(topology.topology_devices("v5e-4")[0])
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    return jax.jit(fn).lower(*jax.tree.map(spec, args)).as_text(dialect="hlo")
