"""The in-memory training source (`config.data.kind='hq_folder'`): unreadable images in the folder are
skipped and named; a folder with none readable is an error naming it."""
import os

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from diffrestorer_jax.data import sources


def test_unreadable_images_are_skipped_and_named(tmp_path, caplog, capsys):
    for i in range(2):
        Image.fromarray(np.full((96, 96, 3), 60 * i, np.uint8)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    # odd files named like images: a link to nowhere, a folder, and a FIFO (opening it would hang)
    os.symlink(tmp_path / "moved_away.png", tmp_path / "link.png")
    os.mkdir(tmp_path / "album.jpg")
    os.mkfifo(tmp_path / "pipe.png")
    c = tiny.get_config("stage1")
    c.data.kind, c.data.hq_dir = "hq_folder", str(tmp_path)
    with caplog.at_level("WARNING"):
        images = sources.load_training_images(c)
    assert images.shape[0] == 2
    for name, reason in (("broken.png", "not an image"), ("link.png", "no such file"),
                         ("album.jpg", "is a directory"), ("pipe.png", "not a regular file")):
        assert any(name in r.message and reason in r.message for r in caplog.records), name
    assert "4 of 6 images" in capsys.readouterr().out
    (tmp_path / "ok0.png").unlink()
    (tmp_path / "ok1.png").unlink()
    caplog.clear()
    with pytest.raises(FileNotFoundError, match="no readable images"):
        sources.load_training_images(c)
