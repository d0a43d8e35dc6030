"""Two local processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train the
toy model exactly like one process x 8 devices: same global (2, 4) mesh, same data, same result."""
import re
import signal

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


def test_host_tree_placed_on_a_mesh_across_processes(tmp_path):
    """What stage 2 does with the stage-1 export it starts from: each process loaded the whole tree,
    `shard_tree` puts it on a mesh whose devices two processes own (jax.device_put refuses that). The
    checksums saved with checkpoints and exports are the same for it as for the host tree."""
    results = procs.run_workers(procs.script("shard_tree_worker.py"), [[], []], procs.distributed_envs(2, 4),
                                str(tmp_path), timeout=300)
    for i, (rc, out) in enumerate(results):
        assert rc == 0 and f"SHARDED OK on process {i} of 2" in out, out[-3000:]
        assert f"CHECKSUMS OK on process {i}" in out, out[-3000:]


def _two(args, tmp_path, tag):
    envs = procs.distributed_envs(2, 4)
    return [procs.Worker(WORKER, args, e, str(tmp_path / f"{tag}{i}.log")) for i, e in enumerate(envs)]


def _finish(workers):
    try:
        codes = [w.wait(300) for w in workers]
    finally:
        for w in workers:
            w.kill()
    outs = [w.output() for w in workers]
    assert codes == [0, 0], [o[-2000:] for o in outs]
    return [int(re.search(r"^PREEMPTED (\d+)$", o, re.MULTILINE).group(1)) for o in outs]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption service tells process 0, both save the same step
    and exit 0 — mid-run, and in a resumed run whose signal comes during start-up (restore,
    compile), before any step. The second needs PreemptionGuard's own check counter: JAX's sync
    point is one past the furthest check made, which for a signal during start-up is 1, a number
    a resumed run's steps never meet (the guard used to pass step numbers)."""
    args = ["--mesh", "2,4,1", "--steps", 200, "--sleep", 0.3, "--workdir", tmp_path / "ckpt"]
    workers = _two(args, tmp_path, "a")
    workers[0].wait_for(r"^STEP 3$", 600)
    workers[1].signal(signal.SIGTERM)
    first = _finish(workers)
    assert first[0] == first[1] and 3 <= first[0] < 200, first
    assert (tmp_path / "ckpt" / str(first[0])).is_dir()
    workers = _two(args, tmp_path, "b")  # resume; signal process 1 as soon as it has joined
    workers[1].wait_for(r"^PROCESSES 1 of 2$", 600)
    workers[1].signal(signal.SIGTERM)
    assert _finish(workers) == first, [w.output()[-2000:] for w in workers]
