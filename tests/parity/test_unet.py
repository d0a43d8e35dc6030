"""UNet2DConditionModel parity with diffusers (random weights, tiny configs) and loader errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

from diffrestorer_jax.convert.core import CheckpointError  # noqa: E402
from diffrestorer_jax.convert.unet import load_unet, open_weights, unet_config_from_state_dict  # noqa: E402

SD1_LIKE = dict(  # conv proj_in/out, attention_head_dim is the head count (diffusers' SD1 quirk)
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
SD2_LIKE = dict(  # linear proj, per-block heads, upcast, 2 transformer layers in one block, odd sizes
    sample_size=18, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, cross_attention_dim=64, attention_head_dim=(2, 4, 4), use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=(1, 2, 1))


def _save_reference(config, folder, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every tensor non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _inputs(config, batch=2, height=None, width=None, seq=7, seed=1):
    rng = np.random.default_rng(seed)
    h = height or config["sample_size"]
    w = width or config["sample_size"]
    x = rng.standard_normal((batch, config["in_channels"], h, w)).astype(np.float32)
    t = np.array([999.0, 17.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, seq, config["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def _fast_jit(fn, *args, **kwargs):
    """fn(*args) compiled without XLA's CPU backend optimisations: halves compile time, same maths."""
    compiled = jax.jit(fn).lower(*args, **kwargs).compile({"xla_backend_optimization_level": 0})
    return compiled(*args, **kwargs)


def _nhwc(a):
    return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def _assert_close(ours_nhwc, ref_nchw):
    ref = ref_nchw.detach().numpy().transpose(0, 2, 3, 1)
    err = np.abs(np.asarray(ours_nhwc) - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), f"max abs error {err} vs max |ref| {np.abs(ref).max()}"


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1") / "unet")
    model = _save_reference(SD1_LIKE, folder)
    return folder, model


def _skip_shapes(model, x, t, ctx):
    """Shapes of the reference's skip features, read by running its down path."""
    down_res, mid = [], None
    with torch.no_grad():
        h = model.conv_in(x)
        temb = model.time_embedding(model.time_proj(t))
        down_res.append(h)
        for block in model.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(h, temb, encoder_hidden_states=ctx)
            else:
                h, res = block(h, temb)
            down_res += list(res)
        mid = model.mid_block(h, temb, encoder_hidden_states=ctx)
    return [r.shape for r in down_res], mid.shape


def _check_parity(folder, model, config, with_residuals, height=None, width=None):
    x, t, ctx = _inputs(config, height=height, width=width)
    xt, tt, ct = map(torch.from_numpy, (x, t, ctx))
    kwargs_t, kwargs_j = {}, {}
    if with_residuals:
        rng = np.random.default_rng(5)
        shapes, mid_shape = _skip_shapes(model, xt, tt, ct)
        down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        mid = rng.standard_normal(mid_shape).astype(np.float32)
        kwargs_t = dict(down_block_additional_residuals=tuple(torch.from_numpy(d) for d in down),
                        mid_block_additional_residual=torch.from_numpy(mid))
        kwargs_j = dict(down_block_additional_residuals=tuple(_nhwc(d) for d in down),
                        mid_block_additional_residual=_nhwc(mid))
    with torch.no_grad():
        ref = model(xt, tt, encoder_hidden_states=ct, **kwargs_t).sample
    module, params = load_unet(folder if with_residuals else os.path.dirname(folder))  # pipeline root
    out = _fast_jit(module.apply, {"params": params}, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx), **kwargs_j)
    assert out.dtype == jnp.float32
    _assert_close(out, ref)


def test_sd1_like_matches_diffusers(sd1_dir):
    folder, model = sd1_dir
    _check_parity(folder, model, SD1_LIKE, with_residuals=False)


def test_sd2_like_matches_diffusers_odd_size_with_residuals(tmp_path):
    folder = str(tmp_path / "unet")
    model = _save_reference(SD2_LIKE, folder)
    _check_parity(folder, model, SD2_LIKE, with_residuals=True, height=18, width=14)


def test_config_inferred_from_weights_matches_saved_config(tmp_path, sd1_dir):
    folder, _ = sd1_dir
    inferred = unet_config_from_state_dict(open_weights(folder), attention_head_dim=4, norm_num_groups=8)
    saved = json.load(open(os.path.join(folder, "config.json")))
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block"):
        assert inferred[key] == saved[key], key
    folder2 = str(tmp_path / "unet")
    _save_reference(SD2_LIKE, folder2)
    inferred = unet_config_from_state_dict(open_weights(folder2))
    assert inferred["use_linear_projection"] is True
    assert inferred["transformer_layers_per_block"] == (1, 2, 1)
    assert inferred["cross_attention_dim"] == 64


# ---------------------------------------------------------------- loader errors
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_weights(folder, edit):
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def test_missing_folder_and_missing_weights(tmp_path, sd1_dir):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_unet(str(tmp_path / "nope"))
    folder = _copy(sd1_dir[0], tmp_path / "unet")
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{folder}: no weights file"):
        load_unet(folder)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_unet(folder)


def test_wrong_model_folder(tmp_path, sd1_dir):
    folder = _copy(sd1_dir[0], tmp_path / "vae")
    config_path = os.path.join(folder, "config.json")
    json.dump({"_class_name": "AutoencoderKL", "latent_channels": 4}, open(config_path, "w"))
    with pytest.raises(CheckpointError, match=f"{config_path}: describes a AutoencoderKL"):
        load_unet(folder)


def test_wrong_shape_missing_and_unexpected_keys_are_named(tmp_path, sd1_dir):
    key = "down_blocks.0.resnets.1.conv1.weight"
    folder = _copy(sd1_dir[0], tmp_path / "shape")
    path = _rewrite_weights(folder, lambda t: t.__setitem__(key, t[key][:, :16].contiguous()))
    with pytest.raises(CheckpointError, match=r"wrongly shaped") as e:
        load_unet(folder)
    assert path in str(e.value) and f"{key}: checkpoint (32, 16, 3, 3)" in str(e.value)

    folder = _copy(sd1_dir[0], tmp_path / "missing")
    path = _rewrite_weights(folder, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="1 missing") as e:
        load_unet(folder)
    assert path in str(e.value) and "down_blocks_0/resnets_1/conv1/kernel" in str(e.value)

    folder = _copy(sd1_dir[0], tmp_path / "unexpected")
    path = _rewrite_weights(folder, lambda t: t.__setitem__("mid_block.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="1 unexpected") as e:
        load_unet(folder)
    assert path in str(e.value) and "mid_block.extra.weight" in str(e.value)


def test_unsupported_config_values_are_refused(tmp_path, sd1_dir):
    from diffrestorer_jax.models.unet import UNet2DConditionModel
    config = json.load(open(os.path.join(sd1_dir[0], "config.json")))
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        UNet2DConditionModel.from_config({**config, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unsupported down block type"):
        UNet2DConditionModel.from_config({**config, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
    folder = _copy(sd1_dir[0], tmp_path / "unet")
    json.dump({**config, "addition_embed_type": "text_time"}, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config.json: .*UNet config: addition_embed_type='text_time' is not supported"):
        load_unet(folder)


# ---------------------------------------------------------------- rematerialisation
def _random_params(module, *args):
    """Random parameters without running (or compiling) `init`: slow on a busy CPU."""
    from flax.core import meta
    from diffrestorer_jax.convert.core import abstract_params
    rng = np.random.default_rng(0)
    shapes = meta.unbox(abstract_params(module, *args))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_remat_full_gives_same_output_and_gradient():
    """On one cross-attention block (the unit the UNet wraps), so the two gradient compiles stay cheap."""
    from diffrestorer_jax.models.unet_blocks import CrossAttnDownBlock2D
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 16)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((1, 32)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 3, 8)), jnp.float32)
    plain = CrossAttnDownBlock2D(32, num_layers=1, heads=2, groups=8, add_downsample=True)
    params = _random_params(plain, x, temb, ctx)

    def loss_and_grad(module):
        def loss(p, x):
            h, skips = module.apply({"params": p}, x, temb, ctx)
            return jnp.sum(h ** 2) + jnp.sum(skips[0] ** 2)
        return _fast_jit(jax.value_and_grad(loss, argnums=(0, 1)), params, x)

    (l0, g0), (l1, g1) = loss_and_grad(plain), loss_and_grad(plain.clone(remat_policy="full"))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    leaves0, leaves1 = jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves_with_path(g1)
    assert [p for p, _ in leaves0] == [p for p, _ in leaves1]  # remat keeps the parameter names
    for (_, a), (_, b) in zip(leaves1, leaves0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()) + 1e-12)


def test_remat_policies_keep_the_unet_parameter_tree():
    from diffrestorer_jax.convert.core import abstract_params
    from diffrestorer_jax.convert.unet import example_inputs
    from diffrestorer_jax.models.unet import UNet2DConditionModel
    module = UNet2DConditionModel.from_config({**SD1_LIKE, "layers_per_block": 1})
    trees = [jax.tree_util.tree_structure(abstract_params(module.clone(remat_policy=p), *example_inputs(module)))
             for p in ("none", "save_dots")]
    assert trees[0] == trees[1]


def test_bfloat16_load_runs_and_stays_close(sd1_dir):
    folder, model = sd1_dir
    x, t, ctx = _inputs(SD1_LIKE)
    with torch.no_grad():
        ref = model(*map(torch.from_numpy, (x, t)), encoder_hidden_states=torch.from_numpy(ctx)).sample
    module, params = load_unet(folder, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = _fast_jit(module.apply, {"params": params}, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx))
    assert out.dtype == jnp.float32  # conv_out runs in float32
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(out) - ref).max() <= 5e-2 * np.abs(ref).max()
