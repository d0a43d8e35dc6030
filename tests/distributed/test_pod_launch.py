"""What launch/train_tpu_pod.sh relies on: DIFFRESTORER_DISTRIBUTED=1 makes every process call
`jax.distributed.initialize()` and let JAX find the cluster, even where nothing the project looks at
says "several hosts" (a GCE TPU VM lists its workers only in its metadata server).

No TPU here, so the processes run on localhost and JAX finds them the way it does on a cluster it
detects from env alone: the coordinator in JAX_COORDINATOR_ADDRESS, the count and id in an Open MPI
env (tests/procs.py `forced_envs`). Without the variable each would train alone.
"""
import re
import signal
import time

import procs

WORKER = procs.script("toy_worker.py")


def _finish(workers, timeout=300):
    try:
        codes = [w.wait(timeout) for w in workers]
    finally:
        for w in workers:
            w.kill()
    outs = [w.output() for w in workers]
    assert codes == [0] * len(workers), [o[-2000:] for o in outs]
    return outs


def test_forced_launch_joins_the_processes_jax_detects(tmp_path):
    results = procs.run_workers(WORKER, [["--mesh", "2,4,1", "--steps", 2]] * 2, procs.forced_envs(2, 4),
                                str(tmp_path), timeout=300)
    for i, (rc, out) in enumerate(results):
        assert rc == 0 and f"PROCESSES {i} of 2" in out and "DONE 2" in out, out[-3000:]


def test_sigterm_while_waiting_for_peers_stops_both_cleanly(tmp_path):
    """diffrestorer-train makes its preemption guard before joining the other hosts: a SIGTERM to a
    worker still waiting for its peers is not fatal; once they have joined it goes to JAX's
    preemption service, so every worker stops at the same check and exits 0."""
    envs = procs.forced_envs(2, 4)
    args = ["--mesh", "2,4,1", "--steps", 200, "--sleep", 0.3, "--guard_first"]
    late = procs.Worker(WORKER, args, envs[1], str(tmp_path / "p1.log"))
    workers = [late]
    try:
        late.wait_for(r"^JOINING$", 300)
        time.sleep(2)  # inside jax.distributed.initialize: process 0, the coordinator, is not up yet
        late.signal(signal.SIGTERM)
        time.sleep(2)
        assert late.proc.poll() is None, late.output()[-3000:]
        workers.insert(0, procs.Worker(WORKER, args, envs[0], str(tmp_path / "p0.log")))
    except BaseException:
        late.kill()
        raise
    outs = _finish(workers)
    stops = [int(re.search(r"^PREEMPTED (\d+)$", o, re.MULTILINE).group(1)) for o in outs]
    assert stops[0] == stops[1] < 200, stops
    assert "PROCESSES 1 of 2" in outs[1], outs[1][-3000:]


def test_missing_peer_ends_the_process_at_the_timeout(tmp_path):
    """Forced, but the other process never starts: JAX gives up after DIFFRESTORER_INIT_TIMEOUT_S
    (its `initialization_timeout`) and ends the process with DEADLINE_EXCEEDED, instead of waiting
    for ever or training alone."""
    env = procs.forced_envs(2, 4, DIFFRESTORER_INIT_TIMEOUT_S=5)[0]
    w = procs.Worker(WORKER, ["--mesh", "1,4,1", "--steps", 2], env, str(tmp_path / "p0.log"))
    try:
        rc = w.wait(120)
    finally:
        w.kill()
    assert rc != 0 and "DEADLINE_EXCEEDED" in w.output() and "START" not in w.output(), w.output()[-3000:]


def test_forced_without_a_cluster_is_a_clear_error(tmp_path):
    """DIFFRESTORER_DISTRIBUTED=1 on a machine that is no cluster JAX knows: the command says so and
    exits 2 at once."""
    env = procs.worker_env(1, DIFFRESTORER_DISTRIBUTED=1)
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        env.pop(k, None)
    w = procs.Worker(procs.command("diffrestorer-train"),
                     ["--config", "configs/tiny.py:stage1", "--workdir", tmp_path / "run"], env,
                     str(tmp_path / "train.log"))
    try:
        rc = w.wait(120)
    finally:
        w.kill()
    out = w.output()
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert "error: DIFFRESTORER_DISTRIBUTED (or force=True) asks for a multi-host run" in out, out[-3000:]
    assert not (tmp_path / "run").exists()


def test_sigterm_on_a_one_process_forced_run(tmp_path):
    """A one-host TPU VM under the pod script: jax.distributed with one process. JAX's preemption
    service took SIGTERM over when it started, but a single process does not ask it; the guard made
    before it must put its own handler back, or the signal is lost and the run goes on."""
    env = procs.forced_envs(1, 8)[0]
    w = procs.Worker(WORKER, ["--mesh", "2,4,1", "--steps", 200, "--sleep", 0.3, "--guard_first"], env,
                     str(tmp_path / "p0.log"))
    workers = [w]
    w.wait_for(r"^STEP 3$", 300)
    w.signal(signal.SIGTERM)
    out = _finish(workers)[0]
    assert "PROCESSES 0 of 1" in out and re.search(r"^PREEMPTED \d+$", out, re.MULTILINE), out[-3000:]
