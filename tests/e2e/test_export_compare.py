"""`compare_exports` / diffrestorer-compare-exports: how `make demo-train` tells whether it reproduced
the shipped checkpoint; `average_exports` / diffrestorer-average-exports: how it averages its two
decoders. Runs on the shipped demo checkpoint and perturbed copies of it."""
import os

import jax
import pytest

from diffrestorer_jax.cli import compare_exports as compare_cli
from diffrestorer_jax.export import compare_exports, load_export, save_export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKPOINT = os.path.join(REPO, "demo", "checkpoint")

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(CHECKPOINT, "config.json")),
                                reason="no shipped demo checkpoint (make demo-train)")


def test_identical_and_perturbed_exports(tmp_path, capsys):
    config, _, params = load_export(CHECKPOINT)
    # nudge one decoder array by 0.25 at a single entry: only the decoder may differ, by exactly that
    leaves, treedef = jax.tree.flatten(params["decoder"])
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(0.25)
    params["decoder"] = jax.tree.unflatten(treedef, leaves)
    other = save_export(str(tmp_path / "other"), params, config)
    diffs = compare_exports(CHECKPOINT, other)
    assert diffs["decoder"] == pytest.approx(0.25, abs=1e-6)
    assert all(d == 0.0 for n, d in diffs.items() if n != "decoder")

    assert compare_cli.main([CHECKPOINT, CHECKPOINT]) == 0
    out = capsys.readouterr().out
    assert "identical parameters" in out
    assert out.count("max |difference| 0\n") == 6


def test_cli_names_what_is_not_an_export(tmp_path, capsys):
    assert compare_cli.main([CHECKPOINT, str(tmp_path)]) == 1
    assert "not an export directory" in capsys.readouterr().err


def test_average_exports(tmp_path, capsys):
    """diffrestorer-average-exports: (1 - w) * A + w * B for the networks that differ, the others
    copied bit for bit, A's config kept; bad weights and other configs refused."""
    from diffrestorer_jax.cli import average_exports as average_cli
    from diffrestorer_jax.export import load_config
    config, _, params = load_export(CHECKPOINT)
    leaves, treedef = jax.tree.flatten(params["decoder"])
    leaves = [x + 1.0 for x in leaves]  # every decoder parameter moved by exactly 1
    params["decoder"] = jax.tree.unflatten(treedef, leaves)
    config.sampler.steps = 3  # B's config: not the one written
    other = save_export(str(tmp_path / "other"), params, config)
    out = str(tmp_path / "soup")
    assert average_cli.main([CHECKPOINT, other, "--weight", "0.25", "--out", out]) == 0
    assert "decoder averaged" in capsys.readouterr().out
    diffs = compare_exports(CHECKPOINT, out)
    assert diffs["decoder"] == pytest.approx(0.25, abs=1e-6)
    assert all(d == 0.0 for n, d in diffs.items() if n != "decoder")
    assert compare_exports(other, out)["decoder"] == pytest.approx(0.75, abs=1e-6)
    assert load_config(out).sampler.steps == load_config(CHECKPOINT).sampler.steps != 3

    assert average_cli.main([CHECKPOINT, other, "--weight", "1.5", "--out", str(tmp_path / "x")]) == 1
    assert "weight must be in [0, 1]" in capsys.readouterr().err
    assert average_cli.main([CHECKPOINT, str(tmp_path), "--out", str(tmp_path / "y")]) == 1
    assert "not an export directory" in capsys.readouterr().err
    config.model.decoder = dict(config.model.decoder, image_fusion_base="decoder")  # same shapes
    third = save_export(str(tmp_path / "third"), params, config)
    assert average_cli.main([CHECKPOINT, third, "--out", str(tmp_path / "z")]) == 1
    assert "other models (config model.decoder differ)" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))
    config = load_config(other)
    config.diffusion.prediction_type = "v_prediction"  # UNets that mean something else
    fourth = save_export(str(tmp_path / "fourth"), params, config)
    assert average_cli.main([other, fourth, "--out", str(tmp_path / "v")]) == 1
    assert "other diffusion processes (config diffusion.prediction_type differ)" in capsys.readouterr().err
    mine = tmp_path / "my results"  # a folder of the user's, not an export: never replaced
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    assert average_cli.main([CHECKPOINT, other, "--out", str(mine)]) == 1
    assert "exists and is not an export (config.json missing): not replaced" in capsys.readouterr().err
    assert average_cli.main([CHECKPOINT, other, "--out", other]) == 1
    assert "is one of the exports averaged" in capsys.readouterr().err
    assert os.listdir(mine) == ["thesis.tex"] and compare_exports(other, out)["decoder"] > 0
    assert not (tmp_path / "v").exists()
    assert average_cli.main([CHECKPOINT, other, "--weight", "0.25", "--out", out]) == 0  # an export: replaced


def test_exports_of_other_shapes_compare_the_networks_shaped_alike(tmp_path, capsys):
    """Two exports whose decoders are shaped differently (an early stage's export against the finished
    checkpoint): the other networks are compared and the decoder is named, not compared; averaging
    them is refused; exports with no network shaped alike cannot be compared at all."""
    from exports import tiny_export, tiny_params
    from diffrestorer_jax.cli import average_exports as average_cli
    from diffrestorer_jax.export import load_config
    from diffrestorer_jax.models import diffrestorer as dr
    small = tiny_export(tmp_path / "small")
    config = load_config(small)
    config.model.decoder = dict(config.model.decoder, rdb_growth=12)
    other = save_export(str(tmp_path / "other"), tiny_params(dr.build_networks(config.model)), config)
    diffs = compare_exports(small, other)
    assert diffs["decoder"] is None
    # tiny_params fills the networks in name order from one stream: those before the decoder are equal
    assert diffs["clip"] == diffs["control"] == 0.0 and diffs["unet"] > 0
    assert compare_cli.main([small, other]) == 0
    out = capsys.readouterr().out
    assert "decoder  shaped differently (other configs): not compared" in out
    assert "the 5 networks compared: parameters differ" in out
    assert average_cli.main([small, other, "--out", str(tmp_path / "soup")]) == 1
    assert "model.decoder differ" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()

    config.model.vae = dict(config.model.vae, block_out_channels=(8, 16, 32))
    config.model.unet = dict(config.model.unet, block_out_channels=(16, 32))
    config.model.clip = dict(config.model.clip, hidden_size=32)
    config.model.prompt = dict(config.model.prompt, hidden_dim=32)
    unlike = save_export(str(tmp_path / "unlike"), tiny_params(dr.build_networks(config.model)), config)
    with pytest.raises(ValueError, match="no network shaped alike"):
        compare_exports(small, unlike)
    assert compare_cli.main([small, unlike]) == 1
    assert "nothing to compare" in capsys.readouterr().err
