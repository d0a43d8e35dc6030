"""Load a diffusers `ControlNetModel` folder (`controlnet/`, or a pipeline root holding one) into
`models.control.ControlModule` + params, strictly, through `convert.core.load_into`.

diffusers has no FiLM; with `use_film=True` the `film_i` parameters are added zero-initialised (their
initial value, so the loaded module computes exactly what the diffusers ControlNet computes).
"""
import os
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax.core import meta

from diffrestorer_jax.convert.core import abstract_params, config_errors, load_into
from diffrestorer_jax.convert.unet import component_dir, open_weights, read_config
from diffrestorer_jax.models.control import ControlModule


def example_inputs(module: ControlModule, batch: int = 1):
    """Smallest inputs that trace the whole control module (for `abstract_params`)."""
    side = 2 ** (len(module.block_out_channels) - 1)
    big = side * module.cond_factor
    return (jnp.zeros((batch, side, side, module.in_channels), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, 1, module.cross_attention_dim), jnp.float32),
            jnp.zeros((batch, big, big, module.conditioning_in_channels), jnp.float32))


def load_control(path: str, dtype=None, use_film: bool = False, *, variant: Optional[str] = None,
                 **module_overrides) -> Tuple[ControlModule, Dict]:
    """(module, params) from a diffusers ControlNet folder. `dtype` sets the compute and parameter
    dtype; `module_overrides` other module fields (attention_impl, remat_policy, ...)."""
    folder = component_dir(path, "controlnet")
    config = read_config(folder, "ControlNetModel")
    if dtype is not None:
        module_overrides = {"dtype": dtype, "param_dtype": dtype, **module_overrides}
    with config_errors(os.path.join(folder, "config.json")):
        module = ControlModule.from_config(config, use_film=use_film, **module_overrides)
        reference = meta.unbox(abstract_params(module, *example_inputs(module)))
    film = {k: v for k, v in reference.items() if k.startswith("film_")}
    rest = {k: v for k, v in reference.items() if not k.startswith("film_")}
    params = load_into(rest, open_weights(folder, variant=variant), dtype=dtype, what="ControlNetModel")
    for name, tree in film.items():  # zero is exactly the FiLM init (identity)
        params[name] = jax.tree.map(lambda s: jnp.zeros(s.shape, dtype or s.dtype), tree)
    return module, params
