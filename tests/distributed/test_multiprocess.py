"""Two local processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train the
toy model exactly like one process x 8 devices: same global (2, 4) mesh, same data, same result."""
import numpy as np

import procs

WORKER = procs.script("toy_worker.py")


def _params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_two_processes_equal_one(tmp_path):
    args = ["--mesh", "2,4,1", "--steps", 3]
    envs = procs.distributed_envs(2, 4) + [procs.worker_env(8)]
    outs = [tmp_path / "multi.npz", tmp_path / "unused.npz", tmp_path / "single.npz"]
    results = procs.run_workers(WORKER, [[*args, "--out", o] for o in outs], envs, str(tmp_path),
                                timeout=300)
    for rc, out in results:
        assert rc == 0, out[-3000:]
        assert "DONE 3" in out and "COMPILES 1" in out
    assert "PROCESSES 0 of 2" in results[0][1] and "PROCESSES 1 of 2" in results[1][1]
    assert "PROCESSES" not in results[2][1]
    assert not (tmp_path / "unused.npz").exists()  # only process 0 writes the gathered params
    multi, single = _params(outs[0]), _params(outs[2])
    assert multi.keys() == single.keys() and len(multi) == 8
    for k in multi:
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)
