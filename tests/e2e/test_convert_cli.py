"""diffrestorer-convert: PyTorch weights -> our format, which then loads without the source files."""
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from diffrestorer_jax import convert
from diffrestorer_jax.cli.convert import main as convert_main

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel
    root = tmp_path_factory.mktemp("src")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4).save_pretrained(root / "unet")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8)
                    ).save_pretrained(root / "clip")
    return root


def test_converted_equals_source(sources, tmp_path):
    out = tmp_path / "converted"
    rc = convert_main(["--unet", str(sources / "unet"), "--clip", str(sources / "clip"), "--out", str(out)])
    assert rc == 0
    for name, load in (("unet", convert.load_unet), ("clip", convert.load_clip_vision)):
        m_src, p_src = load(str(sources / name))
        m_cv, p_cv = load(str(out / name))
        assert m_cv == m_src
        flat_src = {k: np.asarray(v) for k, v in
                    traverse_util.flatten_dict(p_src).items()}
        flat_cv = {k: np.asarray(v) for k, v in
                   traverse_util.flatten_dict(p_cv).items()}
        assert flat_src.keys() == flat_cv.keys()
        for k in flat_src:
            np.testing.assert_array_equal(flat_src[k], flat_cv[k])
    m, p = convert.load_unet(str(out / "unet"))
    y = m.apply({"params": p}, jnp.ones((1, 8, 8, 4)), jnp.array([3]), jnp.ones((1, 2, 16)))
    assert y.shape == (1, 8, 8, 4) and np.isfinite(np.asarray(y)).all()


def test_bfloat16_conversion(sources, tmp_path):
    out = tmp_path / "bf16"
    assert convert_main(["--clip", str(sources / "clip"), "--out", str(out), "--bfloat16"]) == 0
    _, p = convert.load_clip_vision(str(out / "clip"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))


def test_bad_source_is_one_clear_line(tmp_path, capsys):
    rc = convert_main(["--unet", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_out_never_replaces_what_it_did_not_write(sources, tmp_path, capsys):
    """`--out` at the pipeline being converted is refused (its unet/ would have been replaced by the
    conversion); a missing source stops the run before anything is written; an earlier conversion
    is replaced."""
    pipe = tmp_path / "pipe"
    shutil.copytree(sources, pipe)
    before = sorted(str(p.relative_to(pipe)) for p in pipe.rglob("*"))
    assert convert_main(["--unet", str(pipe), "--out", str(pipe)]) == 2
    assert "unet exists and is not an earlier conversion" in capsys.readouterr().err
    assert sorted(str(p.relative_to(pipe)) for p in pipe.rglob("*")) == before
    out = tmp_path / "out"
    assert convert_main(["--clip", str(pipe / "clip"), "--vae", str(tmp_path / "typo"),
                         "--out", str(out)]) == 2
    assert "typo: no such file or folder" in capsys.readouterr().err and not out.exists()
    (out / "clip.old").mkdir(parents=True)  # a backup of the user's where the swap would put the old clip
    assert convert_main(["--unet", str(pipe / "unet"), "--clip", str(pipe / "clip"), "--out", str(out)]) == 2
    assert "clip.old is in the way" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["clip.old"]  # not even the unet was written
    (out / "clip.old").rmdir()
    for _ in range(2):  # the second run replaces the first's conversion
        assert convert_main(["--clip", str(pipe / "clip"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip"]
