"""Evaluation's pairs are named by their paths (<type folder>/LQ/<file>): two folders of one type with
the same file names stay apart, and a name held by several files is reported, not guessed."""
from PIL import Image
import numpy as np

from diffrestorer_jax.tools.evaluate import load_pairs, pair_name


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


def test_same_file_names_in_two_folders_of_one_type(tmp_path):
    for folder in ("noisy", "noise"):  # both are the 'noise' type
        for sub in ("LQ", "GT"):
            _img(tmp_path / folder / sub / "0.png")
    _img(tmp_path / "noise" / "LQ" / "1.png")
    _img(tmp_path / "noise" / "LQ" / "1.jpg")
    _img(tmp_path / "noise" / "GT" / "1.png")
    kind, entries, problems = load_pairs(str(tmp_path))
    names = sorted(name for name, _, _ in entries)
    assert kind == "folders" and names == ["noise/LQ/0.png", "noisy/LQ/0.png"]
    assert {t for _, t, _ in entries} == {"noise"}
    assert sorted(p.rsplit("/", 1)[1] for p, r in problems if "ambiguous" in r) == ["1.jpg", "1.png"]


def test_tfds_records_get_the_folder_name():
    assert pair_name("/data/paired/noisy/LQ/sub/0.png") == "noisy/LQ/sub/0.png"
    assert pair_name("noisy/LQ/0.png") == "noisy/LQ/0.png"
