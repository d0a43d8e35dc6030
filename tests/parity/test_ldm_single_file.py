"""Single-file (CompVis/LDM-keyed) SD checkpoints: our loaders vs diffusers on tiny random models.

The LDM files are written by THIS test with its own diffusers -> LDM key map (independent of the
mapping under test), and each file is first checked with diffusers' own `from_single_file` loader
(offline, config from a local folder): only then is it loaded with ours and compared.
"""
import logging
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from diffrestorer_jax.convert.core import CheckpointError  # noqa: E402
from diffrestorer_jax.convert.ldm import load_unet_single_file, load_vae_single_file  # noqa: E402
from diffrestorer_jax.models.vae import AutoencoderKL  # noqa: E402

TINY_VAE = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                sample_size=32)


def randomize_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} x max|ref| {scale:.3g}"


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


# ------------------------------------------------------------ the test's own diffusers -> LDM maps
def vae_to_ldm(sd, levels):
    """diffusers AutoencoderKL keys -> CompVis first_stage_model keys (attention as 1x1 convs)."""
    out = {}
    for key, t in sd.items():
        k = key
        for mid_old, mid_new in (("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                                 ("mid_block.attentions.0.", "mid.attn_1.")):
            k = k.replace(mid_old, mid_new)
        if "mid.attn_1." in k:
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                         ("to_out.0", "proj_out")):
                k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if t.ndim == 2:
                t = t[:, :, None, None]
        parts = k.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
            head = f"{parts[0]}.{'down' if parts[1] == 'down_blocks' else 'up'}.{level}"
            if parts[3] == "resnets":
                k = f"{head}.block.{parts[4]}." + ".".join(parts[5:])
            else:  # downsamplers.0.conv / upsamplers.0.conv
                k = f"{head}.{'downsample' if parts[3] == 'downsamplers' else 'upsample'}." + ".".join(parts[5:])
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + k] = t.contiguous()
    return out


_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd, layers_per_block, prefix="model.diffusion_model."):
    """diffusers UNet2DConditionModel keys -> CompVis keys (input/middle/output_blocks numbering)."""
    n = layers_per_block + 1  # LDM entries per level: the resnets, then the down/upsampler
    up_has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, t in sd.items():
        p = key.split(".")
        res = lambda q: _RES[q[0]] + "." + ".".join(q[1:])  # noqa: E731
        if p[0] == "conv_in":
            k = "input_blocks.0.0." + p[1]
        elif p[0] == "time_embedding":
            k = f"time_embed.{0 if p[1] == 'linear_1' else 2}.{p[2]}"
        elif p[0] in ("conv_norm_out", "conv_out"):
            k = f"out.{0 if p[0] == 'conv_norm_out' else 2}.{p[1]}"
        elif p[0] == "mid_block":
            k = (f"middle_block.{2 * int(p[2])}.{res(p[3:])}" if p[1] == "resnets"
                 else "middle_block.1." + ".".join(p[3:]))
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                k = f"input_blocks.{(b + 1) * n}.0.op." + ".".join(p[5:])
            else:
                i = 1 + b * n + int(p[3])
                k = f"input_blocks.{i}.0.{res(p[4:])}" if kind == "resnets" else f"input_blocks.{i}.1." + ".".join(p[4:])
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                k = f"output_blocks.{b * n + n - 1}.{2 if b in up_has_attn else 1}.conv." + ".".join(p[5:])
            else:
                i = b * n + int(p[3])
                k = f"output_blocks.{i}.0.{res(p[4:])}" if kind == "resnets" else f"output_blocks.{i}.1." + ".".join(p[4:])
        else:
            raise AssertionError(f"test map does not know {key}")
        out[prefix + k] = t.contiguous()
    return out


def junk_text_encoder():
    """A few cond_stage_model tensors, as in a real SD file (ignored by the VAE and UNet loaders)."""
    return {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(10, 8)}


# ------------------------------------------------------------------------------------------- VAE
@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    ref = randomize_(diffusers.AutoencoderKL(**TINY_VAE), seed=3)
    folder = tmp_path_factory.mktemp("sd")
    ref.save_pretrained(str(folder / "vae"))
    ldm = vae_to_ldm(ref.state_dict(), levels=2)
    ldm.update(junk_text_encoder())
    path = str(folder / "sd_tiny.safetensors")
    save_file(ldm, path)
    return ref, folder, path


def test_vae_ldm_file_is_valid_for_diffusers_and_ours_matches(tiny_vae):
    ref, folder, path = tiny_vae
    theirs = diffusers.AutoencoderKL.from_single_file(path, config=str(folder), subfolder="vae",
                                                      local_files_only=True).eval()
    x = np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.encode(torch.from_numpy(nchw(x))).latent_dist
        got = theirs.encode(torch.from_numpy(nchw(x))).latent_dist
        ref_img = ref.decode(want.mean).sample.numpy()
    np.testing.assert_array_equal(got.mean.numpy(), want.mean.numpy())  # the test's LDM file is right

    module, params = load_vae_single_file(path, norm_num_groups=8)
    assert tuple(module.block_out_channels) == (32, 64) and module.scaling_factor == 0.18215
    mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
    close(nchw(mean), want.mean.numpy())
    close(nchw(logvar), want.logvar.numpy())
    close(nchw(module.apply({"params": params}, mean, method=AutoencoderKL.decode)), ref_img)

    # the same file with the config taken from the diffusers folder gives the same parameters
    _, params2 = load_vae_single_file(path, config=str(folder))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2))


def test_standalone_ldm_vae_file(tiny_vae, tmp_path):
    """A VAE-only LDM file (keys without first_stage_model., plus a discriminator under loss.*)."""
    ref, _, _ = tiny_vae
    sd = {k[len("first_stage_model."):]: v for k, v in vae_to_ldm(ref.state_dict(), 2).items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    path = str(tmp_path / "vae.safetensors")
    save_file(sd, path)
    module, params = load_vae_single_file(path, norm_num_groups=8)
    x = np.random.RandomState(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.encode(torch.from_numpy(nchw(x))).latent_dist.mean.numpy()
    close(nchw(module.apply({"params": params}, x, method=AutoencoderKL.encode)[0]), want)


# ---------------------------------------------------------------------------------------- errors
def test_truncated_safetensors_names_the_file(tiny_vae, tmp_path):
    _, _, path = tiny_vae
    data = open(path, "rb").read()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_vae_single_file(str(bad))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_unet_single_file(str(junk))


def test_ckpt_without_torch_says_convert_to_safetensors(tiny_vae, tmp_path, monkeypatch):
    ref, _, _ = tiny_vae
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": vae_to_ldm(ref.state_dict(), 2)}, str(path))
    module, params = load_vae_single_file(str(path), norm_num_groups=8)  # with torch: loads
    assert module.latent_channels == 4
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"sd.ckpt: .*torch is not installed.*safetensors"):
        load_vae_single_file(str(path))


def test_clip_file_passed_as_sd(tmp_path):
    clip = {"vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 4, 4),
            "vision_model.post_layernorm.weight": torch.randn(8)}
    path = str(tmp_path / "clip.safetensors")
    save_file(clip, path)
    with pytest.raises(CheckpointError, match=r"clip.safetensors: not a single-file Stable Diffusion .*CLIP"):
        load_unet_single_file(path)
    with pytest.raises(CheckpointError, match=r"clip.safetensors: no VAE .*CLIP"):
        load_vae_single_file(path)


# ------------------------------------------------------------------------------------------ UNet
SD1_LIKE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
SD2_LIKE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                norm_num_groups=8, cross_attention_dim=64, attention_head_dim=(2, 4, 4),
                use_linear_projection=True, upcast_attention=True)


def unet_inputs(config, seed=1):
    rng = np.random.default_rng(seed)
    s = config["sample_size"]
    x = rng.standard_normal((2, s, s, config["in_channels"])).astype(np.float32)
    t = np.array([999.0, 17.0], np.float32)
    ctx = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def torch_unet(model, x, t, ctx):
    with torch.no_grad():
        return nhwc(model(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy())


def make_unet_file(config, folder, seed, ema_seed=None):
    """Save a tiny diffusers UNet under folder/unet and an LDM single file (with the tiny VAE and a
    text-encoder stub). With `ema_seed`, `ref` becomes the file's EMA copy (model_ema.*, dots removed)
    and a second random model (returned third) its plain model.diffusion_model.* weights."""
    torch.manual_seed(seed)
    ref = randomize_(diffusers.UNet2DConditionModel(**config), seed)
    ref.save_pretrained(str(folder / "unet"))
    ldm, other = unet_to_ldm(ref.state_dict(), config["layers_per_block"]), None
    if ema_seed is not None:
        other = randomize_(diffusers.UNet2DConditionModel(**config), ema_seed)
        ldm = {**{"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ldm.items()},
               **unet_to_ldm(other.state_dict(), config["layers_per_block"]),
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}
    ldm.update(junk_text_encoder())
    ldm.update(vae_to_ldm(diffusers.AutoencoderKL(**TINY_VAE).state_dict(), 2))
    path = str(folder / "sd.safetensors")
    save_file(ldm, path)
    return ref, path, other


def test_sd1_like_file_with_ema_and_plain_weights(tmp_path, caplog):
    """EMA chosen by default (and logged); the plain weights on request; config inferred from shapes."""
    ema_ref, path, plain_ref = make_unet_file(SD1_LIKE, tmp_path, seed=6, ema_seed=7)
    x, t, ctx = unet_inputs(SD1_LIKE)
    want_ema, want_plain = torch_unet(ema_ref, x, t, ctx), torch_unet(plain_ref, x, t, ctx)
    # diffusers reads the file's plain (non-EMA) weights by default: the test's LDM map is right
    theirs = diffusers.UNet2DConditionModel.from_single_file(path, config=str(tmp_path), subfolder="unet",
                                                             local_files_only=True).eval()
    np.testing.assert_array_equal(torch_unet(theirs, x, t, ctx), want_plain)

    with caplog.at_level(logging.INFO, logger="diffrestorer_jax.convert.ldm"):
        module, params = load_unet_single_file(path, attention_head_dim=4, norm_num_groups=8)
    assert "using the EMA UNet weights" in caplog.text
    _, plain = load_unet_single_file(path, attention_head_dim=4, norm_num_groups=8, prefer_ema=False)
    apply = jax.jit(module.apply)  # one compilation for both parameter sets
    close(apply({"params": params}, x, t, ctx), want_ema)
    close(apply({"params": plain}, x, t, ctx), want_plain)


def test_sd2_like_file_matches_diffusers(tmp_path):
    """Linear projections, per-block heads, upcast attention, one resnet per level; config from folder."""
    ref, path, _ = make_unet_file(SD2_LIKE, tmp_path, seed=5)
    x, t, ctx = unet_inputs(SD2_LIKE)
    want = torch_unet(ref, x, t, ctx)
    theirs = diffusers.UNet2DConditionModel.from_single_file(path, config=str(tmp_path), subfolder="unet",
                                                             local_files_only=True).eval()
    np.testing.assert_array_equal(torch_unet(theirs, x, t, ctx), want)  # the test's LDM file is right
    module, params = load_unet_single_file(path, config=str(tmp_path))
    close(jax.jit(module.apply)({"params": params}, x, t, ctx), want)
