"""Parity of our Flax AutoencoderKL with diffusers' on a tiny random VAE, and load_vae's errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffrestorer_jax.convert.core import CheckpointError  # noqa: E402
from diffrestorer_jax.convert.vae import load_vae  # noqa: E402
from diffrestorer_jax.models.vae import AutoencoderKL  # noqa: E402

TINY_VAE = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                sample_size=32)


def randomize_(model, seed=0):
    """Perturb every parameter so norm scales/biases are not the trivial ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} x max|ref| {scale:.3g}"


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    ref = randomize_(diffusers.AutoencoderKL(**TINY_VAE)).eval()
    root = tmp_path_factory.mktemp("pipe")
    ref.save_pretrained(str(root / "vae"))
    return ref, root


@pytest.fixture(scope="module")
def ours(tiny):
    _, root = tiny
    return load_vae(str(root))  # pipeline root with vae/ inside


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def test_encode_decode_and_features_match_diffusers(tiny, ours, image):
    ref, _ = tiny
    module, params = ours
    feats = []
    hooks = [b.resnets[-1].register_forward_hook(lambda m, i, o: feats.append(o.numpy()))
             for b in ref.encoder.down_blocks]
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(image))).latent_dist
        ref_dec = ref.decode(dist.mean).sample.numpy()
    for h in hooks:
        h.remove()

    mean, logvar, features = jax.jit(lambda p, x: module.apply({"params": p}, x, return_features=True,
                                                               method=AutoencoderKL.encode))(params, image)
    close(nchw(mean), dist.mean.numpy())
    close(nchw(logvar), dist.logvar.numpy())
    assert len(features) == len(feats) == 2
    for i, (f, r) in enumerate(zip(features, feats)):
        # features[i]: resolution H / 2**i, block_out_channels[i] channels
        assert f.shape == (2, 32 // 2 ** i, 32 // 2 ** i, TINY_VAE["block_out_channels"][i])
        close(nchw(f), r)
    dec = module.apply({"params": params}, jnp.asarray(np.asarray(mean)), method=AutoencoderKL.decode)
    close(nchw(dec), ref_dec)
    close(module.apply({"params": params}, image), dec, rel=1e-5)  # __call__ decodes the mean (jit vs eager)


def test_decoder_levels_line_up_with_encoder_features(ours, image):
    """features[i] has the shape of up_blocks[n-1-i]'s resnet output: what the fusing decoder needs."""
    module, params = ours
    n = len(module.block_out_channels)

    def levels(mdl, z):
        dec = mdl.decoder
        h = dec.stem(mdl.post_quant_conv(z))
        shapes = []
        for block in dec.up_blocks:
            h = block.run_resnets(h)
            shapes.append(h.shape)
            h = block.upsample(h)
        return shapes, dec.head(h)

    mean, _, features = module.apply({"params": params}, image, return_features=True,
                                     method=AutoencoderKL.encode)
    shapes, out = module.apply({"params": params}, mean, method=levels)
    assert [tuple(s) for s in shapes] == [tuple(features[n - 1 - k].shape) for k in range(n)]
    close(out, module.apply({"params": params}, mean, method=AutoencoderKL.decode), rel=1e-6)


def test_bfloat16_load_runs_and_is_close(tiny, image):
    ref, root = tiny
    module, params = load_vae(str(root / "vae"), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode)[0])
    m16 = encode(params, image.astype(jnp.bfloat16))
    assert m16.dtype == jnp.bfloat16
    with torch.no_grad():
        ref_mean = ref.encode(torch.from_numpy(nchw(image))).latent_dist.mean.numpy()
    close(nchw(m16.astype(jnp.float32)), ref_mean, rel=5e-2)


def test_from_config_rejects_unsupported_variants():
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKL.from_config({**TINY_VAE, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL.from_config({**TINY_VAE, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})


def test_load_vae_errors_name_the_path(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no AutoencoderKL config.json"):
        load_vae(str(tmp_path))
    (tmp_path / "vae").mkdir()
    cfg = {"_class_name": "AutoencoderKL", **TINY_VAE}
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"vae: no weights found"):
        load_vae(str(tmp_path))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="no AutoencoderKL config.json"):
        load_vae(str(unet))
    # weights of another (bigger) VAE: every wrongly shaped key is listed with the file name
    ref, root = tiny
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [16, 64]}))
    os.symlink(root / "vae" / "diffusion_pytorch_model.safetensors",
               tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: does not match"):
        load_vae(str(tmp_path))
