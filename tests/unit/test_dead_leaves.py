"""data/dead_leaves.py: procedural clean training images."""
import numpy as np

from diffrestorer_jax.data import dead_leaves


def _palette():
    return np.random.default_rng(0).random((64, 3)).astype(np.float32)


def test_image_is_deterministic_in_range_and_not_flat():
    a = dead_leaves.dead_leaves(np.random.default_rng([0, 3]), 48, _palette())
    b = dead_leaves.dead_leaves(np.random.default_rng([0, 3]), 48, _palette())
    c = dead_leaves.dead_leaves(np.random.default_rng([0, 4]), 48, _palette())
    assert a.shape == (48, 48, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert a.std() > 0.05
    # occluding shapes: flat areas (many equal neighbours) and edges (large jumps) both occur
    dx = np.abs(np.diff(a, axis=1)).max(-1)
    assert (dx < 1e-3).mean() > 0.1 and (dx > 0.1).mean() > 0.01


def test_grey_images_occur():
    imgs = [dead_leaves.dead_leaves(np.random.default_rng([1, i]), 32, _palette(), grey_prob=0.5)
            for i in range(12)]
    grey = [np.allclose(x[..., 0], x[..., 1], atol=1e-6) and np.allclose(x[..., 1], x[..., 2], atol=1e-6)
            for x in imgs]
    assert 0 < sum(grey) < len(grey)


def test_write_folder(tmp_path):
    from diffrestorer_jax.data.image_io import read_image
    assert dead_leaves.write_folder(str(tmp_path), 3, size=32, seed=5, palette=_palette()) == 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["dead_leaves_00000.png", "dead_leaves_00001.png", "dead_leaves_00002.png"]
    img = read_image(str(tmp_path / files[1]))
    want = dead_leaves.dead_leaves(np.random.default_rng([5, 1]), 32, _palette())
    np.testing.assert_allclose(img, want, atol=1 / 255 + 1e-6)


def test_cli_writes_the_images_write_folder_gives(tmp_path):
    """`python -m diffrestorer_jax.cli.demo_photos DIR --dead-leaves N` (the demo recipe's data)."""
    from diffrestorer_jax.cli import demo_photos
    from diffrestorer_jax.data.image_io import read_image
    assert demo_photos.main([str(tmp_path / "cli"), "--dead-leaves", "2", "--size", "32", "--seed", "3"]) == 0
    dead_leaves.write_folder(str(tmp_path / "lib"), 2, size=32, seed=3)
    for i in range(2):
        name = f"dead_leaves_{i:05d}.png"
        np.testing.assert_array_equal(read_image(str(tmp_path / "cli" / name)), read_image(str(tmp_path / "lib" / name)))
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["dead_leaves_00000.png", "dead_leaves_00001.png"]


def test_images_default_palette_is_the_training_photos():
    """What `make demo-train` draws (write_folder's default palette) and demo_breakdown reads."""
    from diffrestorer_jax.data import demo_photos
    got = list(dead_leaves.images(2, 16, seed=3))
    palette = dead_leaves.photo_palette(demo_photos.train_photos(64), seed=3)
    assert len(got) == 2
    np.testing.assert_array_equal(got[1], dead_leaves.dead_leaves(np.random.default_rng([3, 1]), 16, palette))
