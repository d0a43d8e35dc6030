"""Checkpoint files from elsewhere are read defensively: a damaged or crafted safetensors header, a
shard index pointing outside its folder, a pickle that would run code, and every other foreseeable
mistake give one clear error naming the file (the convert command: exit 2, no traceback); large
pickles are memory-mapped, not read whole."""
import builtins
import json
import os
import shutil
import struct

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import save_file

from diffrestorer_jax.cli.convert import main as convert_main
from diffrestorer_jax.convert import files, load_clip_vision
from diffrestorer_jax.convert.converted import load_converted
from diffrestorer_jax.convert.core import CheckpointError, StateDict
from diffrestorer_jax.convert.unet import open_weights


def _raw_safetensors(path, header, data_bytes, raw_json=None):
    text = raw_json.encode() if raw_json is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_bytes))
    return str(path)


F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data_bytes, raw_json, message", [
    ({"w": {**F32, "shape": [-2, -2]}}, 16, None, r"tensor 'w': shape \[-2, -2\] is not a list of non-negative"),
    ({"w": {**F32, "shape": [True, 4]}}, 16, None, r"shape \[True, 4\] is not a list of non-negative"),
    ({"w": {**F32, "dtype": "F7"}}, 16, None, r"tensor 'w': unknown dtype 'F7' \(known: F64"),
    ({"w": {**F32, "data_offsets": [0, 1000]}}, 16, None, r"bytes 0\.\.1000 lie outside the 16-byte data"),
    ({"a": F32, "b": {**F32, "data_offsets": [8, 24]}}, 24, None,
     r"tensors 'a' \(bytes 0\.\.16\) and 'b' \(bytes 8\.\.24\) overlap"),
    (None, 16, '{"w": %s, "w": %s}' % (json.dumps(F32), json.dumps(F32)), "header names w more than once"),
    (None, 16, "[1, 2]", "header is a JSON list, not an object"),
    ({"w": [1, 2]}, 16, None, "tensor 'w': entry needs dtype, shape and data_offsets"),
])
def test_safetensors_header_is_validated_before_any_read(tmp_path, header, data_bytes, raw_json, message):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data_bytes, raw_json)
    with pytest.raises(CheckpointError, match=message) as e:
        StateDict(path)
    assert str(e.value).startswith(f"{path}: not a valid safetensors file")


def test_safetensors_header_size_is_capped(tmp_path, monkeypatch):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(4.0).reshape(2, 2)}, str(good))
    np.testing.assert_array_equal(np.asarray(StateDict(str(good))["w"]), np.arange(4.0).reshape(2, 2))
    monkeypatch.setattr(files, "MAX_HEADER_BYTES", 16)  # the real cap is 100 MB; a file that big is slow
    with pytest.raises(CheckpointError, match=r"good\.safetensors: .*exceeds the format's limit of 16 bytes"):
        StateDict(str(good))


def _index(folder, shard_name):
    json.dump({"metadata": {}, "weight_map": {"conv_in.weight": shard_name}},
              open(folder / "diffusion_pytorch_model.safetensors.index.json", "w"))


def test_shard_names_must_stay_inside_the_checkpoint_folder(tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(outside))
    folder = tmp_path / "unet"
    folder.mkdir()
    for name in ("../secret.safetensors", str(outside), "sub/../../secret.safetensors"):
        _index(folder, name)
        with pytest.raises(CheckpointError, match=r"index\.json: shard name .* is not a file name inside"):
            open_weights(str(folder))
    # a symlinked shard (as in a Hugging Face cache folder) is still fine: the name is checked, not the target
    os.symlink(outside, folder / "shard-1.safetensors")
    _index(folder, "shard-1.safetensors")
    assert list(open_weights(str(folder))) == ["conv_in.weight"]

    clip = tmp_path / "clip"
    clip.mkdir()
    json.dump({"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
              open(clip / "config.json", "w"))
    json.dump({"weight_map": {"a": "../secret.safetensors"}}, open(clip / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match=r"shard name '\.\./secret\.safetensors' is not a file name inside"):
        load_clip_vision(str(clip))


class RunsCode:
    """Unpickling this calls exec(...), which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker, ckpt = tmp_path / "code_ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2), "payload": RunsCode(marker)}}, str(ckpt))
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: .*refused by the weights-only unpickler: "
                                              r"it names (builtins\.)?exec, .* so it was not loaded"):
        StateDict(str(ckpt))
    assert convert_main(["--unet", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "evil.ckpt" in err and "Traceback" not in err and "weights_only=False" not in err
    assert not marker.exists()


def test_pickled_checkpoints_are_memory_mapped_not_read_whole(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(2, dtype=torch.bfloat16)}, str(ckpt))
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux /proc to see the process's file mappings")
    sd = StateDict(str(ckpt))
    with open("/proc/self/maps") as f:
        assert str(ckpt) in f.read(), "the checkpoint's tensors should stay in a file mapping"
    np.testing.assert_array_equal(np.asarray(sd["w"]), np.arange(6.0).reshape(2, 3))
    assert str(np.asarray(sd["h"]).dtype) == "bfloat16"
    legacy = tmp_path / "legacy.ckpt"  # torch < 1.6's format cannot be mapped: read whole, still loads
    torch.save({"w": torch.ones(3)}, str(legacy), _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(np.asarray(StateDict(str(legacy))["w"]), np.ones(3))


def _bad_sources(tmp):
    """(flag, path, text the error must contain) for each foreseeable mistake."""
    empty = tmp / "empty.safetensors"
    empty.write_bytes(b"")
    text = tmp / "notes.ckpt"
    text.write_text("not a checkpoint")
    listcfg = tmp / "listcfg"
    listcfg.mkdir()
    (listcfg / "config.json").write_text("[1, 2]")
    badtype = tmp / "badtype"
    badtype.mkdir()
    json.dump({"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": "two",
               "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "norm_num_groups": 8,
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
               "attention_head_dim": 4}, open(badtype / "config.json", "w"))
    save_file({"conv_in.weight": torch.zeros(1)}, str(badtype / "diffusion_pytorch_model.safetensors"))
    escape = tmp / "escape"
    escape.mkdir()
    (escape / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    _index(escape, "../empty.safetensors")
    families = {"sd3": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2),
                         "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, "Stable Diffusion 3"),
                "flux": ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, "FLUX"),
                "sdxl": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
                          "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2),
                          "first_stage_model.encoder.conv_in.weight": torch.zeros(2)}, "SDXL"),
                "other": ({"model.diffusion_model.blocks.0.weight": torch.zeros(2)}, "holds no input_blocks"),
                # SD 2.x unCLIP: a UNet with class embeddings, beside a standard VAE (which converts)
                "unclip": ({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(2),
                            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)},
                           "class / size embeddings")}
    for name, (tensors, _) in families.items():
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    return [("--unet", tmp / "nowhere", "nowhere"),
            *[(flag, tmp / f"{name}.safetensors", expected) for name, (_, expected) in families.items()
              for flag in ("--unet", "--vae") if name not in ("other", "unclip") or flag == "--unet"],
            ("--clip", empty, "empty.safetensors: not a valid safetensors"),
            ("--vae", text, "notes.ckpt: cannot be read"), ("--vae", listcfg, "JSON list, not an object"),
            ("--unet", listcfg, "JSON list, not an object"), ("--clip", listcfg, "JSON list, not an object"),
            ("--unet", badtype, "badtype/config.json: cannot build the model"),
            ("--unet", escape, "is not a file name inside")]


def test_convert_reports_every_foreseeable_error_in_one_line(tmp_path, capsys):
    for flag, path, expected in _bad_sources(tmp_path):
        rc = convert_main([flag, str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and "Traceback" not in err, (flag, path, rc, err)
    (tmp_path / "file").write_text("x")
    assert convert_main(["--unet", str(tmp_path / "nowhere"), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'file'}: exists and is not a folder" in err


def test_a_damaged_or_foreign_converted_folder_is_one_clear_line(tmp_path, capsys):
    """A converted folder from another version of the code, edited, or with a lost parameter file
    loads as a CheckpointError naming it (convert: exit 2, no traceback)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, image_size=16, patch_size=8)
                    ).save_pretrained(tmp_path / "src")
    assert convert_main(["--clip", str(tmp_path / "src"), "--out", str(tmp_path / "good")]) == 0
    good = tmp_path / "good" / "clip"

    def spec(edit):
        def change(folder):
            d = json.loads((folder / "flax_module.json").read_text())
            edit(d)
            (folder / "flax_module.json").write_text(json.dumps(d))
        return change

    def lose_a_params_file(folder):
        (next(p for p in sorted((folder / "params").rglob("*")) if p.is_file()
              and p.name in ("_METADATA", "manifest.ocdbt"))).unlink()

    def change_a_weight(folder):  # Orbax's files have no checksum: this read back as other weights
        _, params = load_converted(str(folder))
        flat = jax.tree.leaves(params)
        kernel = np.array(flat[0])
        kernel.reshape(-1)[0] += 1.0
        with ocp.StandardCheckpointer() as ckptr:  # the same format, one value changed
            shutil.rmtree(folder / "params")
            ckptr.save(folder / "params", jax.tree.unflatten(jax.tree.structure(params), [kernel] + flat[1:]))

    cases = {"a field from another version": (spec(lambda d: d["fields"].update(old_field=1)),
                                              "does not fit this version's CLIPVisionTransformer"),
             "no fields": (spec(lambda d: d.pop("fields")), "KeyError"),
             "fields null": (spec(lambda d: d.update(fields=None)), "AttributeError"),
             "a lost params file": (lose_a_params_file, "the parameters cannot be read"),
             "a changed weight": (change_a_weight, r"damaged: 1 parameter array\(s\) read back are not what was "
                                                   r"saved \(.+\); convert the weights again")}
    for i, (case, (damage, expected)) in enumerate(cases.items()):
        folder = tmp_path / f"case{i}" / "clip"
        shutil.copytree(good, folder)
        damage(folder)
        with pytest.raises(CheckpointError, match=expected):
            load_clip_vision(str(folder))
        assert convert_main(["--clip", str(folder), "--out", str(tmp_path / f"out{i}")]) == 2, case
        err = capsys.readouterr().err
        assert str(folder) in err and "Traceback" not in err, (case, err)
