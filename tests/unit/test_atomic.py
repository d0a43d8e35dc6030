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
    atomic.resolve(final)
    assert version(final) == "old" and sorted(os.listdir(tmp_path)) == ["export"]
    with pytest.raises(ValueError):
        with atomic.replacing(final) as tmp:
            write(tmp, "bad")
            raise ValueError("a failed save")
    assert version(final) == "old" and sorted(os.listdir(tmp_path)) == ["export"]


def test_old_version_is_put_back_when_the_new_one_is_incomplete(tmp_path):
    final = str(tmp_path / "export")
    os.makedirs(final + atomic.OLD)
    write(final + atomic.OLD, "old")
    os.makedirs(final + atomic.NEW)  # no marker: incomplete
    atomic.resolve(final)
    assert version(final) == "old" and sorted(os.listdir(tmp_path)) == ["export"]


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
