"""The export format: everything needed to restore images, in one directory.

    <dir>/config.json   the run's config (ConfigDict JSON): rebuilds the networks
    <dir>/params/       Orbax checkpoint of {clip, prompt, control, unet, vae, decoder}
    <dir>/checksums.json  a 32-bit checksum of every parameter array (`checksums.state_checksums`)

Training writes it at the end (EMA weights for the networks it trained, the frozen ones as they
were); restoring reads it, and `config.weights.init_from` starts a later stage from it. Arrays may
be sharded when saved; `load_export` reads them into whatever layout the caller asks for (default:
one device), so an export moves freely between meshes and machines. `load_config` lays the saved
config over `config_base.base_config()`, so readers find every field, with today's default where an
older export lacks one. Orbax's files carry no checksum, so `load_export` compares the parameters it
read with checksums.json and raises DamagedExport naming the arrays that differ (exports written
before the file existed load unchecked).
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from diffrestorer_jax import atomic, paths
from diffrestorer_jax.checksums import differing, state_checksums
from diffrestorer_jax.config_base import base_config
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import sharding

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKSUMS_FILE = "checksums.json"


class DamagedExport(ValueError):
    """An export's parameters read back with other values than were saved (a damaged file)."""
# Network configs in reference-implementation field names: taken as saved, never merged with the
# base config's presets (a missing field means the module's own default, as in diffusers).
AS_SAVED = ("model.unet", "model.vae", "model.clip")


def save_export(directory: str, params: Dict[str, Any], config) -> str:
    """Write params (all six networks) + config JSON to `directory` (local or a URL), replacing an
    existing export atomically: a kill at any moment leaves the previous export or the new one."""
    directory = paths.path(directory)
    missing = [n for n in dr.NETWORKS if n not in params]
    if missing:
        raise ValueError(f"save_export: params lack networks {missing}; an export holds all of "
                         f"{list(dr.NETWORKS)}")
    params = {n: params[n] for n in dr.NETWORKS}
    primary = jax.process_index() == 0
    if primary:
        atomic.begin(directory)
    mesh_lib.barrier(f"export {directory}: new version begun")
    tmp = directory.parent / (directory.name + atomic.NEW)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / PARAMS_DIR, params)
            ckpt.wait_until_finished()
        checksums = state_checksums(sharding.unbox(params))  # every process: the arrays may be sharded
        if primary:
            text = config.to_json(indent=2) if hasattr(config, "to_json") else json.dumps(config, indent=2)
            (tmp / CONFIG_FILE).write_text(text)
            (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=0, sort_keys=True))
        mesh_lib.barrier(f"export {directory}: new version written")
    except BaseException:
        if primary:
            atomic.abort(directory)
        raise
    if primary:
        atomic.commit(directory)
    mesh_lib.barrier(f"export {directory}: committed")
    return str(directory)


def over_base(saved: Dict[str, Any]) -> ml_collections.ConfigDict:
    """`saved` (a config as a plain dict) laid over the base config: saved values win, fields it
    lacks take the base's defaults, the networks' own configs (`AS_SAVED`) are kept whole."""
    def merge(base: Dict[str, Any], new: Dict[str, Any], prefix: str) -> Dict[str, Any]:
        out = dict(base)
        for key, value in new.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and isinstance(out.get(key), dict) and path not in AS_SAVED:
                out[key] = merge(out[key], value, path + ".")
            else:
                out[key] = value
        return out
    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved, ""))


def load_config(directory: str) -> ml_collections.ConfigDict:
    """The export's config over the base config (see `over_base`)."""
    if atomic.interrupted(directory):  # a save killed mid-swap: put the whole version in place
        atomic.resolve(directory)
    path = paths.path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an export directory: {CONFIG_FILE} is missing "
                                f"(exports are written to <workdir>/export at the end of training)")
    return over_base(json.loads(path.read_text()))


def abstract_params(nets: dr.Networks, image_size: int):
    """Boxed ShapeDtypeStructs of all six networks (no computation)."""
    return jax.eval_shape(lambda k: dr.init_params(nets, k, image_size), jax.random.PRNGKey(0))


def load_export(directory: str, shardings: Optional[Any] = None, mesh=None, rules=None,
                names=None, device=None) -> Tuple[ml_collections.ConfigDict, dr.Networks, Dict[str, Any]]:
    """(config, nets, params) of an export. Arrays land on `shardings` (a tree like params), or
    are sharded by the logical rules over `mesh`, or go to `device` (default: the first local
    device). `names` selects which networks are returned (default: all six)."""
    config = load_config(directory)
    nets = dr.build_networks(config.model)
    names = tuple(names or dr.NETWORKS)
    boxed = abstract_params(nets, int(config.image_size))
    one = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    if shardings is None:
        if mesh is not None:
            shardings = sharding.tree_shardings(boxed, mesh, rules or sharding.DEFAULT_RULES)
        else:
            shardings = jax.tree.map(lambda _: one, sharding.unbox(boxed))
    else:
        shardings = {n: shardings[n] if n in shardings else jax.tree.map(lambda _: one, sharding.unbox(boxed[n]))
                     for n in dr.NETWORKS}
    target = sharding.abstract_with_shardings(boxed, shardings)
    path = paths.path(directory) / PARAMS_DIR
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(path, target=target)
    check_values(directory, params)
    return config, nets, {n: params[n] for n in names}


def check_values(directory: str, params) -> None:
    """Raise DamagedExport if `params` (all six networks, as read from `directory`) do not have the
    checksums saved beside them; nothing to check for an export without checksums.json."""
    path = paths.path(directory) / CHECKSUMS_FILE
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedExport(f"{directory}: {CHECKSUMS_FILE} is damaged ({e})") from None
    differ = differing(saved, state_checksums(sharding.unbox(params)))
    if differ:
        raise DamagedExport(
            f"{directory}: the export is damaged: {len(differ)} parameter array(s) read back are not what "
            f"was saved ({'; '.join(differ[:5])}{'; ...' if len(differ) > 5 else ''}); copy or export it again")


def compare_exports(a: str, b: str) -> Dict[str, Optional[float]]:
    """Largest absolute parameter difference per network between two exports (0.0: bit for bit
    the same; None: shaped differently, other configs, not compared), so a stage's export can be
    checked against a checkpoint whose later stages changed one network. Raises ValueError if no
    network is shaped alike."""
    _, _, params_a = load_export(a)
    _, _, params_b = load_export(b)

    def max_abs_diff(x, y):
        return float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)), initial=0.0))
    diffs = {}
    for name in dr.NETWORKS:
        if jax.tree.map(lambda x: x.shape, params_a[name]) != jax.tree.map(lambda x: x.shape, params_b[name]):
            diffs[name] = None
            continue
        diffs[name] = max(jax.tree.leaves(jax.tree.map(max_abs_diff, params_a[name], params_b[name])),
                          default=0.0)
    if all(d is None for d in diffs.values()):
        raise ValueError(f"{a} and {b} hold no network shaped alike (other configs): nothing to compare")
    return diffs


def _check_out(out: str, inputs) -> None:
    """Refuse an `out` that is one of the inputs or an existing folder that is not an export (it
    would be replaced, with whatever the user keeps in it)."""
    def same(p, q):
        return (os.path.realpath(p) == os.path.realpath(q)) if not (paths.is_url(p) or paths.is_url(q)) \
            else str(paths.path(p)) == str(paths.path(q))
    if any(same(out, p) for p in inputs):
        raise ValueError(f"--out {out} is one of the exports averaged: write the average elsewhere")
    folder = paths.path(out)
    if folder.exists() and not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"--out {out} exists and is not an export ({CONFIG_FILE} missing): not replaced")


def _average_leaf(x, y, weight: float, name: str):
    """(1 - weight) * x + weight * y in float32; non-float leaves must be equal."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if not bool(jnp.array_equal(x, y)):
            raise ValueError(f"'{name}' holds a non-float parameter that differs between the exports: "
                             "it cannot be averaged")
        return x
    return ((1.0 - weight) * x.astype(jnp.float32) + weight * y.astype(jnp.float32)).astype(x.dtype)


def average_exports(a: str, b: str, weight: float, out: str) -> list:
    """Write to `out` the export whose parameters are (1 - weight) * a + weight * b (a "model soup":
    e.g. a decoder and its fine-tuned copy), with a's config. Networks that are bit for bit equal in
    both are copied from a unchanged; returns the names of those that were averaged. Raises
    ValueError for a weight outside [0, 1] or exports of other models (their config's `model`
    section differs; equal sections give equally shaped networks, which load_export enforces)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"average_exports: weight must be in [0, 1], got {weight}")
    _check_out(out, (a, b))
    config, _, params_a = load_export(a)
    config_b, _, params_b = load_export(b)
    how_it_runs = ("dtype", "attention_impl", "remat_policy")  # not what the networks compute
    model_a, model_b = ({k: v for k, v in c.model.to_dict().items() if k not in how_it_runs}
                        for c in (config, config_b))
    if model_a != model_b:
        keys = sorted(k for k in set(model_a) | set(model_b) if model_a.get(k) != model_b.get(k))
        raise ValueError(f"{a} and {b} are exports of other models (config model.{', model.'.join(keys)} "
                         "differ): nothing to average")
    diffusion_a, diffusion_b = config.diffusion.to_dict(), config_b.diffusion.to_dict()
    if diffusion_a != diffusion_b:  # e.g. epsilon against v prediction: UNets that mean other things
        keys = sorted(k for k in set(diffusion_a) | set(diffusion_b) if diffusion_a.get(k) != diffusion_b.get(k))
        raise ValueError(f"{a} and {b} were trained for other diffusion processes (config "
                         f"diffusion.{', diffusion.'.join(keys)} differ): nothing to average")
    averaged, params = [], {}
    for name in dr.NETWORKS:
        same = all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(params_a[name]),
                                                               jax.tree.leaves(params_b[name])))
        if same:
            params[name] = params_a[name]
            continue
        averaged.append(name)
        params[name] = jax.tree.map(lambda x, y: _average_leaf(x, y, weight, name), params_a[name], params_b[name])
    save_export(out, params, config)
    return averaged
