"""Worker script: train the toy model with checkpoints, resume, preemption; optionally multi-process.

Prints one line per event for the parent test to follow:
  JOINING                 about to start jax.distributed (a no-op on one process)
  START <step>            training begins (after restore, if a checkpoint existed)
  STEP <n>                n updates done
  PREEMPTED <n>           SIGTERM handled: checkpoint of step n written, exiting 0
  COMPILES <k>            train-step compilations in this process
  DONE <n>
Multi-process: env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or
DIFFRESTORER_DISTRIBUTED=1 and a cluster JAX detects (see tests/procs.py).
"""
import argparse
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

import toy_train
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import sharding
from diffrestorer_jax.train.checkpoint import Checkpointer
from diffrestorer_jax.train.preemption import PreemptionGuard


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--save_every", type=int, default=2)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--mesh", default="2,4,1", help="data,fsdp,tensor")
    p.add_argument("--out", default="", help="npz of the final params (written by process 0)")
    p.add_argument("--guard_first", action="store_true",
                   help="make the preemption guard before jax.distributed starts, as diffrestorer-train does")
    return p.parse_args()


def restore_or_init(ckpt, tx, targets, mesh):
    if ckpt is None or ckpt.latest_step() is None:
        return toy_train.init_state(tx, mesh), 0
    state, _, data = ckpt.restore(targets)
    step = int(jax.device_get(state["step"]))
    assert data == {"next_step": step}, (data, step)
    return state, step


def main():
    args = parse()
    guard = PreemptionGuard() if args.guard_first else None
    print("JOINING", flush=True)
    if mesh_lib.maybe_initialize_distributed():
        if guard is not None:
            guard.distributed_started()
        print(f"PROCESSES {jax.process_index()} of {jax.process_count()}", flush=True)
    jax.config.update("jax_default_matmul_precision", "highest")
    data, fsdp, tensor = (int(v) for v in args.mesh.split(","))
    mesh = mesh_lib.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})
    ckpt = Checkpointer(args.workdir, save_every=args.save_every, keep=2) if args.workdir else None
    guard = guard or PreemptionGuard()
    with sharding.CompileCounter("train_step") as counter:
        tx, targets, _, bsh, train_step = toy_train.plan(mesh)
        state, step = restore_or_init(ckpt, tx, targets, mesh)
        print(f"START {step}", flush=True)
        if guard.should_stop(step):  # a signal during start-up, checked as train.loop does
            if ckpt is not None:
                ckpt.save(step, state, {"mesh": args.mesh}, {"next_step": step})
                ckpt.close()
            print(f"PREEMPTED {step}", flush=True)
            return 0
        while step < args.steps:
            state, _ = train_step(state, toy_train.put_batch(toy_train.batch_at(step), bsh))
            step += 1
            print(f"STEP {step}", flush=True)
            if ckpt is not None:
                ckpt.maybe_save(step, state, {"mesh": args.mesh}, {"next_step": step})
            if guard.should_stop(step):
                if ckpt is not None:
                    ckpt.save(step, state, {"mesh": args.mesh}, {"next_step": step})
                    ckpt.close()
                print(f"PREEMPTED {step}", flush=True)
                return 0
            time.sleep(args.sleep)
    if ckpt is not None:
        ckpt.save(step, state, {"mesh": args.mesh}, {"next_step": step})
        ckpt.close()
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    if args.out and jax.process_index() == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(args.out, **flat)
    print(f"COMPILES {counter.count}", flush=True)
    print(f"DONE {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
