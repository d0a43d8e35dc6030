"""Replacing a directory atomically (diffrestorer_jax/atomic.py): a kill at any point of a save leaves
the old version or the new one, whole; and exports use it."""
import os

import jax
import jax.numpy as jnp
import pytest

from diffrestorer_jax import atomic, export, paths
from diffrestorer_jax.config_base import load_config_file
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel.sharding import unbox

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def version(path):
    return open(os.path.join(path, "v.txt")).read() if os.path.isdir(path) else None


def write(folder, v):
    with open(os.path.join(folder, "v.txt"), "w") as f:
        f.write(v)


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs (not even `except Exception`)."""


@pytest.mark.parametrize("kill_at", range(3))  # before the 1st rename, between the two, after
def test_a_kill_at_any_rename_leaves_one_whole_version(tmp_path, monkeypatch, kill_at):
    final = str(tmp_path / "export")
    with atomic.replacing(final) as tmp:
        write(tmp, "old")
    calls = {"n": 0}
    real = os.rename

    def dying_rename(a, b):
        if calls["n"] == kill_at:
            raise Killed()
        calls["n"] += 1
        real(a, b)

    monkeypatch.setattr(atomic.os, "rename", dying_rename)
    with pytest.raises(Killed):
        tmp = atomic.begin(final)
        write(tmp, "new")
        atomic.commit(final)
        raise Killed()  # kill_at past the last rename: died after the swap, before anything else
    monkeypatch.setattr(atomic.os, "rename", real)
    monkeypatch.setattr(atomic, "process_alive", lambda pid: False)  # the writer is dead
    before = version(final)
    atomic.resolve(final)
    # once the new version is complete (its marker written before any rename) it wins
    assert version(final) == "new", (kill_at, before)
    assert sorted(os.listdir(tmp_path)) == ["export"] and os.listdir(final) == ["v.txt"]


def test_a_kill_while_writing_keeps_the_old_version(tmp_path):
    final = str(tmp_path / "export")
    with atomic.replacing(final) as tmp:
        write(tmp, "old")
    tmp = atomic.begin(final)
    write(tmp, "half")  # no commit: the writer died here
    assert version(final) == "old"
    atomic.resolve(final)  # a reader leaves the half-written version; the next writer clears it
    assert version(final) == "old" and sorted(os.listdir(tmp_path)) == ["export", "export.new"]
    with pytest.raises(ValueError):
        with atomic.replacing(final) as tmp:
            write(tmp, "bad")
            raise ValueError("a failed save")
    assert version(final) == "old" and sorted(os.listdir(tmp_path)) == ["export"]


def test_a_retired_version_is_put_back_when_the_new_one_went_missing(tmp_path):
    final = str(tmp_path / "export")
    os.makedirs(final + atomic.OLD)
    write(final + atomic.OLD, "old")
    open(os.path.join(final + atomic.OLD, atomic.RETIRED), "w").close()  # as a swap marks it
    atomic.resolve(final)
    assert version(final) == "old" and sorted(os.listdir(tmp_path)) == ["export"]
    assert os.listdir(final) == ["v.txt"]


def test_what_this_module_did_not_write_is_never_moved_or_removed(tmp_path):
    """A user's backups beside a path (`model.safetensors.old`, `unet.new/`, `vae.old/`) survive
    every reader, and a writer refuses to start rather than remove them."""
    (tmp_path / "model.safetensors").write_text("weights")
    (tmp_path / "model.safetensors.old").write_text("my backup")
    for name in ("unet.new", "vae.old"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "w.bin").write_text(name)
    before = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    for path in ("model.safetensors", "unet", "vae", "missing"):
        assert not atomic.interrupted(str(tmp_path / path))
        atomic.resolve(str(tmp_path / path))
    for path, sibling in (("unet", "unet.new"), ("vae", "vae.old")):
        with pytest.raises(FileExistsError, match=sibling):
            atomic.begin(str(tmp_path / path))
    assert {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == sorted(["model.safetensors", "model.safetensors.old",
                                                   "unet.new", "vae.old"])


def test_a_reader_leaves_a_live_writers_version_alone(tmp_path):
    """A reader (training start, restore, another convert) while a writer of this host is at work
    leaves its `.new` as it is, complete or not; the writer's own commit then swaps it in."""
    final = str(tmp_path / "export")
    with atomic.replacing(final) as tmp:
        write(tmp, "old")
    tmp = atomic.begin(final)
    write(tmp, "new")
    assert atomic.interrupted(final)
    assert not atomic.resolve(final) and version(final) == "old" and version(tmp) == "new"
    open(os.path.join(tmp, atomic.COMPLETE), "w").close()  # complete, the writer not yet swapping
    assert not atomic.resolve(final) and version(final) == "old"
    atomic.commit(final)
    assert version(final) == "new" and sorted(os.listdir(tmp_path)) == ["export"]
    assert os.listdir(final) == ["v.txt"]


def test_export_interrupted_while_writing_reads_as_the_previous_one(tmp_path, monkeypatch):
    """save_export killed after the params, before the config: the previous export loads unchanged;
    the next save replaces it."""
    cfg = load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    shapes = unbox(export.abstract_params(dr.build_networks(cfg.model), int(cfg.image_size)))
    ones = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), shapes)
    twos = jax.tree.map(lambda a: 2 * a, ones)
    final = str(tmp_path / "export")
    export.save_export(final, ones, cfg)
    path_type = type(paths.path(final))
    real_write = path_type.write_text

    def dying_write(self, *a, **k):  # the process dies as the new export's config is written
        if self.name == export.CONFIG_FILE:
            raise Killed()
        return real_write(self, *a, **k)

    monkeypatch.setattr(path_type, "write_text", dying_write)
    with pytest.raises(Killed):
        export.save_export(final, twos, cfg)
    monkeypatch.setattr(path_type, "write_text", real_write)
    _, _, params = export.load_export(final)
    assert float(params["unet"]["conv_in"]["kernel"].ravel()[0]) == 1.0
    assert sorted(os.listdir(tmp_path)) == ["export"]
    export.save_export(final, twos, cfg)
    _, _, params = export.load_export(final)
    assert float(params["unet"]["conv_in"]["kernel"].ravel()[0]) == 2.0
