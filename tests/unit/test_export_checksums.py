"""Exports carry a checksum of every parameter array (checksums.json): Orbax's files have none, and a
byte changed in a data file read back as other numbers without an error. load_export compares, and
the restore command says the export is damaged instead of restoring with other weights."""
import json

import jax
import numpy as np
import pytest

from diffrestorer_jax import checksums
from diffrestorer_jax.export import CHECKSUMS_FILE, DamagedExport, load_export
from diffrestorer_jax.infer.restorer import Restorer, RestoreError
import damage
from exports import tiny_export


def _leaves(params):
    return jax.tree.leaves(jax.device_get(params))


def test_a_changed_byte_never_loads_as_other_weights(tmp_path):
    export = tiny_export(tmp_path / "export")
    _, _, params = load_export(export)
    expected = _leaves(params)
    assert set(json.loads((tmp_path / "export" / CHECKSUMS_FILE).read_text())) == set(
        checksums.state_checksums(params))
    outcomes, message = damage.load_after_each_changed_byte(
        damage.largest_file(tmp_path / "export" / "params"), lambda: load_export(export)[2], DamagedExport)
    for params in outcomes:
        if not isinstance(params, str):  # a byte no array reads: the saved weights
            for got, want in zip(_leaves(params), expected):
                np.testing.assert_array_equal(got, want)
    assert "damaged" in outcomes, outcomes
    assert "the export is damaged: 1 parameter array(s) read back are not what was saved" in message
    assert message.endswith("copy or export it again")
    with pytest.raises(RestoreError, match=r"cannot load the parameters \(DamagedExport: .*export is damaged"):
        Restorer.from_export(export)


def test_host_and_device_checksums_agree_and_see_one_bit():
    rng = np.random.default_rng(0)
    tree = {"f32": rng.normal(size=(37, 5)).astype(np.float32),
            "bf16": rng.normal(size=(9,)).astype(jax.numpy.bfloat16),
            "i32": rng.integers(-5, 5, size=(4, 4)).astype(np.int32), "flag": rng.random(10) > 0.5,
            "long": rng.normal(size=(checksums._HOST_CHUNK + 3,)).astype(np.float32)}  # two NumPy passes
    on_host = checksums.state_checksums(tree)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    cpu_sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
                   for k, v in tree.items()}
    assert checksums.state_checksums(cpu_sharded) == on_host
    assert checksums._checksum_program(None)([tree["f32"]])[0] == on_host["f32"]  # the device program
    # split over both axes of a mesh: each shard summed at its place in the whole; shards of over
    # _HOST_CHUNK words go by slabs
    grid = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    split = {"f32": (tree["f32"][:36, :4], jax.sharding.PartitionSpec("a", "b")),
             "rows": (rng.normal(size=(checksums._HOST_CHUNK // 2 + 4, 4)).astype(np.float32),
                      jax.sharding.PartitionSpec("a"))}
    for name, (x, spec) in split.items():
        placed = jax.device_put(x, jax.sharding.NamedSharding(grid, spec))
        assert checksums.state_checksums({name: placed}) == checksums.state_checksums({name: x}), name
        assert checksums.state_checksums({name: placed})[name] == int(checksums._checksum_program(None)([x])[0])
    flipped = tree["f32"].copy()
    flipped.view(np.uint32)[3, 1] ^= 1
    assert checksums.differing(on_host, checksums.state_checksums({**tree, "f32": flipped})) == ["f32"]
