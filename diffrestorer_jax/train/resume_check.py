"""What a resumed run may change: the saved config and frozen weights against the current ones.

A resume continues a run, so what defines it must not move under it: the stage, seed, model, data,
degradations, diffusion schedule, batch and the pretrained weights (`REFUSED`). Those changes stop the
run with a list of what changed, unless the user says they mean it (`diffrestorer-train
--allow_config_changes`). Everything else (learning rate, number of steps, logging, the mesh) is
allowed and listed. The given networks (the frozen ones, and with `weights.init_trained` the
trained ones' starting weights) are rebuilt from `weights.*` on every resume, so a fingerprint of
them is saved with each checkpoint and must match too.
"""
import hashlib
import json
from typing import Any, Dict, List, Tuple

import jax
import numpy as np

REFUSED = ("stage", "seed", "image_size", "model.", "data.", "degradation.", "diffusion.", "weights.",
           "train.batch_size", "train.grad_accum_steps", "train.degrade_size")
# Inside the refused sections but not what the run computes: how fast it reads or runs.
ALLOWED = ("data.num_threads", "data.prefetch", "data.device_prefetch", "model.attention_impl",
           "model.remat_policy")


# Fields added to the config after runs were saved without them: the value that reproduces what such
# a run computed (a saved config without the field counts as having it).
ADDED_LATER = {"degradation.rng": "rbg", "train.degrade_size": 0, "weights.init_trained": False}


class ResumeMismatch(ValueError):
    """The workdir's checkpoint was made by another run configuration or other frozen weights."""


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _plain(config) -> Dict[str, Any]:
    return json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))


def config_changes(saved: Dict[str, Any], current) -> Tuple[List[str], List[str]]:
    """(refused, allowed): 'path: saved -> current' lines for every field that differs."""
    a, b = _flat(saved), _flat(_plain(current))
    a = {**{k: v for k, v in ADDED_LATER.items() if k in b}, **a}
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        is_refused = any(key == r or (r.endswith(".") and key.startswith(r)) for r in REFUSED)
        (refused if is_refused and not key.startswith(ALLOWED) else allowed).append(line)
    return refused, allowed


def fingerprint(params: Dict[str, Any]) -> Dict[str, str]:
    """{network: hex digest} of given weights: every leaf's path, shape, dtype and a strided sample of
    its values (64 Ki per leaf at most), so other weights at the same paths are caught cheaply."""
    out = {}
    for name in sorted(params):
        h = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[name])[0]:
            stride = max(1, int(np.prod(leaf.shape)) // 65536)
            sample = np.asarray(jax.device_get(leaf.reshape(-1)[::stride]))
            h.update(f"{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype}".encode())
            h.update(sample.tobytes())
        out[name] = h.hexdigest()[:16]
    return out


def check_resume(saved_config: Dict[str, Any], config, saved_fingerprint, current_fingerprint,
                 allow_changes: bool = False) -> List[str]:
    """Raise ResumeMismatch for a refused change or other frozen weights (unless `allow_changes`);
    return the lines describing the allowed changes (for the console)."""
    refused, allowed = config_changes(saved_config or {}, config) if saved_config else ([], [])
    problems = list(refused)
    if saved_fingerprint is not None and saved_fingerprint != current_fingerprint:
        names = sorted(n for n in set(saved_fingerprint) | set(current_fingerprint)
                       if saved_fingerprint.get(n) != current_fingerprint.get(n))
        problems.append(f"the frozen weights ({', '.join(names)}) differ from those the checkpoint was "
                        "trained with (weights.* or init_from now hold other weights; with "
                        "weights.init_trained, so may the trained networks' starting weights)")
    if problems and not allow_changes:
        raise ResumeMismatch(
            "this workdir holds a checkpoint of another run; resuming would silently change:\n  "
            + "\n  ".join(problems)
            + "\nUse another --workdir, restore the original settings, or pass --allow_config_changes "
              "if the change is intended.")
    return allowed + (problems if allow_changes else [])
