"""The shared checkpoint reader: sharded checkpoints (`*.index.json`) load like single files."""
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import save_file

from diffrestorer_jax.convert import load_clip_vision, load_unet
from diffrestorer_jax.convert.core import CheckpointError, ShardedStateDict


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])


def test_sharded_clip_and_unet_equal_single_file(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8))
    clip.save_pretrained(tmp_path / "clip_single")
    clip.save_pretrained(tmp_path / "clip_sharded", max_shard_size="20KB")
    assert list((tmp_path / "clip_sharded").glob("*.index.json"))
    _assert_same(load_clip_vision(str(tmp_path / "clip_single"))[1],
                 load_clip_vision(str(tmp_path / "clip_sharded"))[1])

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(tmp_path / "unet_single")
    unet.save_pretrained(tmp_path / "unet_sharded", max_shard_size="50KB")
    assert list((tmp_path / "unet_sharded").glob("*.index.json"))
    _assert_same(load_unet(str(tmp_path / "unet_single"))[1], load_unet(str(tmp_path / "unet_sharded"))[1])


def test_key_in_two_shards_is_an_error(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "s2.safetensors")
    with pytest.raises(CheckpointError, match="key b appears in two shards"):
        ShardedStateDict([str(tmp_path / "s1.safetensors"), str(tmp_path / "s2.safetensors")], "idx.json")
    sd = ShardedStateDict([str(tmp_path / "s1.safetensors")], "idx.json")
    assert sorted(sd) == ["a", "b"] and sd.shape("a") == (2,)
    np.testing.assert_array_equal(np.asarray(sd["b"]), np.ones(2))
