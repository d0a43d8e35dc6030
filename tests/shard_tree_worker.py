"""Worker script: place a host tree on a (2, 4) mesh spanning two processes with
`sharding.shard_tree` (as stage 2 places the stage-1 export it starts from), then gather it back.
Prints "SHARDED OK" when every process's shards and the gathered whole equal the host tree, and
"CHECKSUMS OK" when `checksums.state_checksums` of the placed tree (each process sums its own shards,
the parts added across processes) equals that of the host tree (a process-local leaf counted once)."""
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from diffrestorer_jax import checksums
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import sharding


def main():
    mesh_lib.maybe_initialize_distributed()
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    host = {"kernel": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "bias": np.float32([1, 2, 3])}
    # An export's params load onto this process's first device (export.load_export); converted
    # weights arrive as numpy arrays.
    tree = {"kernel": jax.device_put(host["kernel"], jax.local_devices()[0]), "bias": host["bias"]}
    shardings = {"kernel": NamedSharding(mesh, PartitionSpec("fsdp")),
                 "bias": NamedSharding(mesh, PartitionSpec())}
    placed = sharding.shard_tree(tree, shardings)
    for name, x in placed.items():
        assert x.sharding == shardings[name], (name, x.sharding)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), host[name][shard.index])
    whole = multihost_utils.process_allgather(placed, tiled=True)
    for name in host:
        np.testing.assert_array_equal(whole[name], host[name])
    print(f"SHARDED OK on process {jax.process_index()} of {jax.process_count()}", flush=True)
    step = np.int32(7)  # process-local, as a restored step counter can be
    expected = checksums.state_checksums({**host, "step": step})
    assert checksums.state_checksums({**placed, "step": step}) == expected
    changed = {**host, "kernel": host["kernel"] + np.float32(1) * (np.arange(8)[:, None] == 5)}
    assert checksums.differing(expected, checksums.state_checksums(
        {**sharding.shard_tree(changed, shardings), "step": step})) == ["kernel"]
    print(f"CHECKSUMS OK on process {jax.process_index()}", flush=True)


if __name__ == "__main__":
    main()
