"""Tiny exports for the tests of the commands that read one (restore, evaluate, the app): the tiny
config with seeded random weights, written in the export format. Not a test file."""
import os

import jax
import numpy as np

from diffrestorer_jax.config_base import load_config_file
from diffrestorer_jax.export import save_export
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel.sharding import unbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_params(nets, image_size=32, seed=0):
    """The shapes of `init_params`, filled with seeded random values: every branch (the zero-initialised
    control and decoder ones included) acts, and no init program has to be compiled (a minute on CPU)."""
    abstract = unbox(jax.eval_shape(lambda k: dr.init_params(nets, k, image_size), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1])
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.02 * z
        if len(leaf.shape) >= 2:
            return z / np.sqrt(np.prod(leaf.shape[:-1]))
        return 0.02 * z
    return jax.tree_util.tree_map_with_path(fill, abstract)


def tiny_export(directory):
    cfg = load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    cfg.sampler.steps = 2
    nets = dr.build_networks(cfg.model)
    save_export(str(directory), tiny_params(nets), cfg)
    return str(directory)
