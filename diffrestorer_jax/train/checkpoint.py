"""Orbax checkpointing of the train state, the config and the data iterator's position.

One checkpoint step = three items, so a run restarts exactly where it was:
  'state'   the train state (sharded jax arrays; each host writes its own shards, asynchronously);
  'config'  the run's config as JSON (to see what produced a checkpoint, and to detect mismatches);
  'data'    the input pipeline's state, an opaque JSON-able dict (or bytes) from the caller.
Each step also carries small run facts as Orbax step metadata (`run_info`: the frozen weights'
fingerprint), read back by `saved_run_info`, and a checksum of every state array (`state_checksums`):
Orbax's files have none, so a damaged file could restore as other numbers without an error; a
restore that does not give back the saved values raises `DamagedCheckpoint` naming the arrays.
Temporary folders of saves that a kill interrupted are removed when the manager opens the
directory; only committed steps are ever restored.
Restore takes a *target*: the abstract state whose ShapeDtypeStructs carry the shardings wanted now
(`sharding.abstract_with_shardings`). Orbax reads each shard straight into that layout, so a
checkpoint written on a (2, 4) mesh loads onto (8, 1) or one device, and the restored arrays carry the
very sharding objects the compiled step expects (no recompile after a restore).
RNG keys in the state must be raw uint32 arrays (`jax.random.PRNGKey`), not typed key arrays.
"""
import base64
import json
import logging
from typing import Any, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from diffrestorer_jax import paths
from diffrestorer_jax.checksums import differing, leaf_name, state_checksums

_BYTES_TAG = "__bytes_base64__"
CHECKSUM_KEY = "state_checksum"


def _config_to_json(config) -> dict:
    """ConfigDict / dict -> plain JSON-able dict (ConfigDict.to_json handles tuples and nesting)."""
    if config is None:
        return {}
    if hasattr(config, "to_json"):
        return json.loads(config.to_json())
    return json.loads(json.dumps(config, default=str))


def _data_to_json(data_state) -> dict:
    if isinstance(data_state, (bytes, bytearray)):
        return {_BYTES_TAG: base64.b64encode(bytes(data_state)).decode("ascii")}
    return {} if data_state is None else dict(data_state)


def _data_from_json(blob):
    if isinstance(blob, Mapping) and set(blob) == {_BYTES_TAG}:
        return base64.b64decode(blob[_BYTES_TAG])
    return blob


class Checkpointer:
    """A CheckpointManager that saves every `save_every` steps, keeps the last `keep`, async by default.

    The loop calls `maybe_save(step, ...)` every step (cheap when it is not a save step) and
    `save(step, ..., force=True)` on preemption; `close()` (or the context manager) waits for pending
    writes, which is what makes an exit after a save safe.
    """

    def __init__(self, directory: str, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = paths.path(directory)  # local or a URL (gs://...): Orbax takes both
        self.save_every = max(1, int(save_every))
        # The interval is ours (step % save_every == 0); orbax's own rule also saves the first step seen.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config", "data"))

    def maybe_save(self, step: int, state, config=None, data_state=None, force: bool = False,
                   run_info: Optional[dict] = None) -> bool:
        """Save if `step` is a multiple of `save_every` (or `force`); returns whether a save started."""
        if not force and int(step) % self.save_every:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  config=ocp.args.JsonSave(_config_to_json(config)),
                                  data=ocp.args.JsonSave(_data_to_json(data_state)))
        metadata = {**(run_info or {}), CHECKSUM_KEY: state_checksums(state)}
        saved = self.manager.save(int(step), args=args, force=True, custom_metadata=metadata)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def save(self, step: int, state, config=None, data_state=None, run_info: Optional[dict] = None) -> bool:
        """Save now, whatever the interval (preemption, end of training). Skips an existing step."""
        if int(step) in self.manager.all_steps():
            return False
        return self.maybe_save(step, state, config, data_state, force=True, run_info=run_info)

    def saved_config(self, step: int) -> dict:
        """The config JSON saved with `step`, read alone (to check a resume before restoring state)."""
        restored = self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def saved_run_info(self, step: int) -> dict:
        """The `run_info` saved with `step` ({} for checkpoints written without it), with the state's
        checksums under CHECKSUM_KEY (absent in checkpoints of versions before them)."""
        return dict(self.manager.metadata(int(step)).custom_metadata or {})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def restore(self, target_state, step: Optional[int] = None) -> Tuple[Any, dict, Any]:
        """(state, config_json, data_state) of `step` (default: latest) laid out like `target_state`.

        `target_state` is a tree of ShapeDtypeStructs with shardings (or arrays, whose shardings are
        used). Raises FileNotFoundError naming the directory when there is nothing to restore.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                                    f"{self.directory} (steps there: {self.all_steps()})")
        target = jax.tree.map(_as_target, target_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore()))
        except ValueError as e:  # orbax's words for a state of other shapes: say which, and what to do
            changes = self._shape_changes(step, target)
            if not changes:
                raise
            raise ShapeMismatch(
                f"{self.directory}: the checkpoint at step {step} holds a train state of other shapes "
                f"than this config's ({len(changes)} arrays differ: {'; '.join(changes[:5])}"
                f"{'; ...' if len(changes) > 5 else ''}). A change of the model's shapes cannot resume, "
                "even with --allow_config_changes: use another --workdir (weights.init_from=<an export> "
                "with weights.init_trained=True starts from that export's trained networks)") from e
        self._check_values(step, restored["state"])
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored["state"], restored["config"], _data_from_json(restored["data"])

    def _check_values(self, step: int, state) -> None:
        """Raise DamagedCheckpoint if `state` (just read) does not have the checksums saved with it."""
        saved = self.saved_run_info(step).get(CHECKSUM_KEY)
        if saved is None:  # written before checksums were
            return
        differ = differing(saved, state_checksums(state))
        if differ:
            earlier = [s for s in self.all_steps() if s < step]
            raise DamagedCheckpoint(
                f"{self.directory}: the checkpoint at step {step} is damaged: {len(differ)} array(s) read "
                f"back are not what was saved ({'; '.join(differ[:5])}{'; ...' if len(differ) > 5 else ''}). "
                + (f"Move {self.directory / str(step)} out of the folder to resume from step {max(earlier)}."
                   if earlier else "There is no earlier checkpoint step to resume from."))

    def _shape_changes(self, step: int, target) -> list:
        """'name: saved (a, b), now (c, d)' for each array whose shape the saved state and `target`
        do not share (from the saved metadata; [] if that cannot be read)."""
        try:
            with ocp.StandardCheckpointer() as reader:
                saved = reader.metadata(self.directory / str(step) / "state").item_metadata.tree
        except Exception:  # noqa: BLE001  no readable metadata: orbax's own error stands
            return []
        saved_shapes, wanted_shapes = _shapes_by_name(saved), _shapes_by_name(target)
        return [f"{name}: saved {saved_shapes.get(name, 'nothing')}, now {wanted_shapes.get(name, 'nothing')}"
                for name in sorted(saved_shapes.keys() | wanted_shapes.keys())
                if saved_shapes.get(name) != wanted_shapes.get(name)]

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class ShapeMismatch(ValueError):
    """The checkpoint's train state has other shapes than the one asked for (another model)."""


class DamagedCheckpoint(ValueError):
    """A checkpoint step's state read back with other values than were saved (a damaged file)."""


def _shapes_by_name(tree) -> dict:
    """{'ema.unet.conv_in.kernel': shape} of a state tree (dataclass fields and dict keys alike)."""
    return {leaf_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, "shape")}


def _as_target(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
