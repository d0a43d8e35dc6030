"""From logically-annotated state to NamedShardings, sharded init, and compile-once step functions.

The flow (maxdiffusion/maxtext style, written small):
  abstract = jax.eval_shape(init_fn, ...)          # boxed (nn.Partitioned) ShapeDtypeStructs, no memory
  shardings = tree_shardings(abstract, mesh, rules)  # ONE NamedSharding tree, reused everywhere
  state = jit(init_fn, out_shardings=shardings)()    # every array is born sharded
Jit cache keys include the sharding objects, so the same tree is handed to init, the compiled step and
checkpoint restore; building fresh-but-equal shardings is harmless, but a *different* layout forces a
recompile, which `CompileCounter` makes visible in tests.
"""
import contextlib
import logging
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffrestorer_jax.parallel.rules import DEFAULT_RULES

_LOGGED_FALLBACKS = set()
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _is_box(x) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox(tree):
    """Strip nn.Partitioned boxes without applying sharding constraints (out_shardings do that)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree,
                        is_leaf=_is_box)


def logical_specs(abstract_tree):
    """The logical PartitionSpec of every leaf (unannotated leaves, e.g. step counters: replicated)."""
    return nn.get_partition_spec(abstract_tree)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def _fit_dim(mesh: Mesh, axes, size: int):
    """Drop mesh axes (innermost first) from one dimension until they divide its size.

    Tiny configs have 3- or 4-channel convs that an 8-way fsdp axis cannot split; replicating that one
    dimension costs nothing, while refusing to run would make the tiny configs useless on a pod.
    """
    if axes is None:
        return None
    kept = [axes] if isinstance(axes, str) else list(axes)
    while kept and size % _axis_size(mesh, kept):
        kept.pop()
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else tuple(kept)


def _as_list(axes):
    return [] if axes is None else [axes] if isinstance(axes, str) else list(axes)


def _rehome(fitted, spec, shape, mesh: Mesh):
    """Mesh axes `_fit_dim` dropped, moved to another dimension of the same weight that they divide
    (largest first), so SD 1.5's 320/640-channel kernels are split over 256 chips by their other
    channel dimension (1280, 2560, ...) instead of replicated on every chip with their gradients
    and Adam moments. Spatial kernel dims (3) never divide, so only channel dims take them."""
    dropped = [a for axes, kept in zip(tuple(spec), fitted) for a in _as_list(axes)
               if a not in _as_list(kept) and mesh.shape[a] > 1]
    out = [_as_list(k) for k in fitted]
    for axis in dropped:
        used = {a for axes in out for a in axes}
        if axis in used:
            continue
        order = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in order:
            if shape[i] % (_axis_size(mesh, out[i] + [axis])) == 0:
                out[i] = out[i] + [axis]
                break
    return tuple(None if not a else a[0] if len(a) == 1 else tuple(a) for a in out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, where: str = "") -> PartitionSpec:
    """`spec` made to fit `shape`: a mesh axis that does not divide its dimension moves to another
    dimension it divides (`_rehome`), or is dropped (that weight replicated over it); each change
    is logged once."""
    fitted = tuple(_fit_dim(mesh, axes, dim) for axes, dim in zip(tuple(spec), shape))
    if fitted != tuple(spec)[:len(fitted)]:
        fitted = _rehome(fitted, spec, shape, mesh)
    if fitted != tuple(spec)[:len(fitted)]:
        key = (tuple(spec), tuple(shape), tuple(mesh.shape.items()))
        if key not in _LOGGED_FALLBACKS:
            _LOGGED_FALLBACKS.add(key)
            lost = ({a for axes in tuple(spec) for a in _as_list(axes) if mesh.shape[a] > 1}
                    - {a for axes in fitted for a in _as_list(axes)})
            log = logging.warning if lost else logging.info
            log("sharding %s%s: %s does not divide shape %s on mesh %s; using %s%s",
                where, "" if not where else " ", spec, tuple(shape), dict(mesh.shape),
                PartitionSpec(*fitted), f" (replicated over {sorted(lost)})" if lost else "")
    return PartitionSpec(*fitted)


def tree_shardings(abstract_tree, mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """A NamedSharding for every leaf of a boxed abstract tree (the structure of the unboxed tree)."""
    mesh_specs = nn.logical_to_mesh(logical_specs(abstract_tree), rules)
    shapes = unbox(abstract_tree)

    def one(path, spec, leaf):
        where = jax.tree_util.keystr(path)
        return NamedSharding(mesh, fit_spec(spec, getattr(leaf, "shape", ()), mesh, where))

    return jax.tree_util.tree_map_with_path(
        one, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings: restore targets and AOT-lowering arguments."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        unbox(abstract_tree), shardings)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """Mesh + logical rules in scope, so `layers.constrain` inside models becomes a real constraint."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def plan_sharded(init_fn: Callable, mesh: Mesh, rules: Sequence, *args):
    """(targets, shardings) for the state `init_fn(*args)` would build, without computing it.

    `targets` are ShapeDtypeStructs carrying the shardings: what a restore reads into and what AOT
    compilation lowers against, so a resumed run never materialises a throw-away random init.
    """
    with mesh_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh, rules)
    return abstract_with_shardings(abstract, shardings), shardings


def init_sharded(init_fn: Callable, mesh: Mesh, rules: Sequence, *args,
                 compiler_options: Optional[dict] = None):
    """Run `init_fn(*args)` (which returns a boxed tree) so that every output is born sharded.

    Returns (state, shardings); keep `shardings` and pass it on (step, checkpoint restore). The args
    (e.g. an RNG key, example inputs) are replicated; only their shapes should matter to init.
    `compiler_options` are XLA options for this one program (tests use a low optimisation level).
    """
    with mesh_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = tree_shardings(abstract, mesh, rules)
        init = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings,
                       compiler_options=compiler_options)
        return init(*args), shardings


def shard_tree(tree, shardings):
    """Place a host/loaded tree (e.g. converted frozen weights) onto the mesh with given shardings.

    With several processes every process holds the whole tree (each loaded the same file) and
    builds the global array from the shards of its own devices: `jax.device_put` refuses a
    sharding over devices another process owns."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, RNG keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence = DEFAULT_RULES) -> NamedSharding:
    """The sharding of an input batch: leading dim as 'activation_batch', the rest replicated."""
    spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def compile_step(step_fn: Callable, in_shardings, out_shardings, donate_argnums: Sequence[int],
                 *example_args, mesh: Optional[Mesh] = None, rules: Sequence = DEFAULT_RULES,
                 compiler_options: Optional[dict] = None):
    """Ahead-of-time compile `step_fn` for the example args (arrays or ShapeDtypeStructs).

    The result is a `jax.stages.Compiled`: calling it can never trigger a recompile (a wrong shape or
    sharding raises instead), which is the guarantee a pod run needs. Compile cost and per-device
    memory are then readable from `compiled.cost_analysis()` / `memory_analysis()`. Pass `mesh` (and
    rules) when the model uses `layers.constrain`; `compiler_options` go to XLA for this program only.
    """
    jitted = jax.jit(step_fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums))
    ctx = mesh_context(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with ctx:
        return jitted.lower(*example_args).compile(compiler_options)


class CompileCounter:
    """Counts XLA backend compilations, optionally only of functions whose name contains `name`.

    Use as a context manager around a training loop; `count` is read after. It listens to JAX's own
    compile-duration event, so it sees every compile (jit cache misses, AOT compiles, recompiles caused
    by a changed sharding after a restore), not just the ones our code intends.
    """

    def __init__(self, name: Optional[str] = None):
        self.name = name
        self.count = 0
        self.names = []

    def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration
        fun_name = str(kwargs.get("fun_name", ""))
        if event == _BACKEND_COMPILE_EVENT and (self.name is None or self.name in fun_name):
            self.count += 1
            self.names.append(fun_name)

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)
        return False
