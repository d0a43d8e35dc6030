"""How the restore program holds its weights (infer/program.py): cast to the inference dtype, and
replicated or sharded over 8 fake CPU devices; sharded weights gather back to the very same numbers,
and the abstract placement the AOT tool compiles against is the one the CLI makes."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from diffrestorer_jax.infer.program import GatherOnUse, Shard, abstract_weights, cast_weights, place_weights
from diffrestorer_jax.parallel.mesh import make_mesh


def _params():
    rng = np.random.default_rng(0)
    return {"unet": {"conv": {"kernel": rng.standard_normal((3, 3, 5, 7)).astype(np.float32),
                              "bias": rng.standard_normal(7).astype(np.float32)}},
            "clip": {"embed": rng.standard_normal((11, 13)).astype(np.float32),
                     "scale": np.ones(1, np.float32)}}


def test_cast_keeps_biases_and_scales():
    cast = cast_weights(_params(), jnp.bfloat16)
    assert cast["unet"]["conv"]["kernel"].dtype == jnp.bfloat16 and cast["clip"]["embed"].dtype == jnp.bfloat16
    assert cast["unet"]["conv"]["bias"].dtype == np.float32 and cast["clip"]["scale"].dtype == np.float32
    abstract = cast_weights(jax.eval_shape(lambda: _params()), jnp.bfloat16)
    assert jax.tree.map(lambda a: a.dtype, abstract) == jax.tree.map(lambda a: a.dtype, cast)


def test_sharded_weights_gather_to_the_same_numbers():
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:8])
    params = cast_weights(_params(), jnp.bfloat16)
    placed = place_weights(params, mesh, "sharded")
    kernel = placed["unet"]["conv"]["kernel"]
    assert isinstance(kernel, Shard) and kernel.shape == (3, 3, 5, 7)
    assert kernel.data.shape == (320,) and kernel.data.dtype == jnp.bfloat16  # 315 padded to 8 x 40
    assert {s.data.shape for s in kernel.data.addressable_shards} == {(40,)}
    bias = placed["clip"]["scale"]  # even a 1-element weight: padded to one element per device
    assert bias.data.shape == (8,)

    gathered = jax.jit(jax.shard_map(lambda p: {n: GatherOnUse(p)[n] for n in ("unet", "clip")}, mesh=mesh,
                                     in_specs=(PartitionSpec("data"),), out_specs=PartitionSpec(),
                                     check_vma=False))(placed)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), gathered, params)

    # The AOT tool lowers against abstract_weights: the same tree, shapes, dtypes and shardings.
    abstract = abstract_weights(jax.eval_shape(lambda: params), mesh, "sharded")
    describe = lambda t: [(a.shape, a.dtype, a.sharding.spec) for a in jax.tree.leaves(t)]  # noqa: E731
    assert jax.tree.structure(abstract) == jax.tree.structure(placed)
    assert describe(abstract) == describe(placed)
    replicated = place_weights(params, mesh, "replicated")
    assert describe(abstract_weights(jax.eval_shape(lambda: params), mesh, "replicated")) == describe(replicated)
    assert replicated["unet"]["conv"]["kernel"].sharding.is_fully_replicated
