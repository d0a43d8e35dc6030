"""Image-guided Control Module: init invariants, FiLM identity, diffusers ControlNet parity, grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from diffrestorer_jax.models.control import ControlModule, init_control_from_unet
from diffrestorer_jax.models.unet import UNet2DConditionModel

UNET = dict(  # tiny SD1-like UNet: 6 skips (conv_in, 2+1, 2)
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
COND = (8, 16, 32)  # two stride-2 steps: LQ 32x32 for 8x8 latents


def _inputs(batch=2, seed=1):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    t = np.array([999.0, 17.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, 5, 32)).astype(np.float32)
    lq = rng.uniform(0, 1, (batch, 32, 32, 3)).astype(np.float32)
    return z, t, ctx, lq


def _perturb(params, pred, seed, scale=0.05):
    """Every leaf whose path satisfies `pred` gets Gaussian noise (plain, unboxed trees)."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)  # numpy noise: no per-shape compilation
    out = {p: (jnp.asarray(np.asarray(v) + scale * rng.standard_normal(v.shape).astype(v.dtype)) if pred(p) else v)
           for p, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def _zero_init(path):
    top = path[0]
    return (top.startswith("controlnet_down_blocks") or top == "controlnet_mid_block" or top.startswith("film_")
            or (top == "controlnet_cond_embedding" and path[1] == "conv_out"))


@pytest.fixture(scope="module")
def fresh():
    """A UNet with random params and a control module initialised from it (boxed trees, as init
    gives), plus the control module's jitted apply (shared, so it compiles once)."""
    from diffrestorer_jax.convert.core import abstract_params
    unet = UNet2DConditionModel.from_config(UNET)
    control = ControlModule.from_unet_config(UNET, conditioning_channels=COND, use_film=True)
    z, t, ctx, lq = map(jnp.asarray, _inputs())
    rng = np.random.default_rng(0)  # random UNet params from shapes only: no init to compile
    unet_params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape).astype(np.float32)),
                               meta.unbox(abstract_params(unet, z, t, ctx)))
    control_params = jax.jit(control.init)(jax.random.PRNGKey(1), z, t, ctx, lq)["params"]
    control_params = init_control_from_unet(control_params, unet_params)
    return unet, control, unet_params, meta.unbox(control_params), jax.jit(control.apply)


def test_fresh_control_gives_zero_residuals_and_leaves_the_unet_unchanged(fresh):
    unet, control, up, cp, apply = fresh
    assert isinstance(cp["conv_in"]["kernel"], jax.Array)
    for key in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, cp[key], up[key])
    assert len([k for k in cp if k.startswith("controlnet_down_blocks_")]) == 6
    z, t, ctx, lq = map(jnp.asarray, _inputs())
    down, mid = apply({"params": cp}, z, t, ctx, lq, control_scale=jnp.float32(2.0))
    assert len(down) == 6 and all(float(jnp.abs(d).max()) == 0.0 for d in down) and float(jnp.abs(mid).max()) == 0.0
    bare = jax.jit(unet.apply)({"params": up}, z, t, ctx)
    with_control = jax.jit(unet.apply)({"params": up}, z, t, ctx, down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid)
    np.testing.assert_array_equal(np.asarray(bare), np.asarray(with_control))


def test_film_is_the_identity_at_init_and_acts_when_trained(fresh):
    _, control, _, cp, apply = fresh
    cp = _perturb(cp, lambda p: _zero_init(p) and not p[0].startswith("film_"), 2)
    plain = control.clone(use_film=False)
    z, t, ctx, lq = map(jnp.asarray, _inputs())
    no_film = {k: v for k, v in cp.items() if not k.startswith("film_")}
    ref_down, ref_mid = jax.jit(plain.apply)({"params": no_film}, z, t, ctx, lq, control_scale=jnp.float32(1.0))
    assert float(jnp.abs(ref_mid).max()) > 0
    down, mid = apply({"params": cp}, z, t, ctx, lq, control_scale=jnp.float32(1.0))
    for a, b in zip(down + (mid,), ref_down + (ref_mid,)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = _perturb(cp, lambda p: p[0].startswith("film_"), 3, scale=0.5)
    _, mid2 = apply({"params": moved}, z, t, ctx, lq, control_scale=jnp.float32(1.0))
    assert float(jnp.abs(mid2 - mid).max()) > 1e-3


def test_gradients_reach_every_parameter(fresh):
    _, control, _, cp, apply = fresh
    z, t, ctx, lq = map(jnp.asarray, _inputs())
    rng = np.random.default_rng(7)
    weights = [jnp.asarray(rng.standard_normal(s.shape).astype(np.float32)) for s in
               jax.tree.leaves(jax.eval_shape(control.apply, {"params": cp}, z, t, ctx, lq))]

    def loss(p):  # linear in the residuals, so the zero convs get a gradient at init
        out = jax.tree.leaves(control.apply({"params": p}, z, t, ctx, lq, control_scale=0.7))
        return sum(jnp.sum(o * w) for o, w in zip(out, weights))

    grad = jax.jit(jax.grad(loss))
    # At init only the output zero convs see a gradient (their inputs are nonzero); after one
    # perturbation of the zero-initialised parts, every parameter does.
    grads = traverse_util.flatten_dict(grad(cp))
    assert all(float(jnp.abs(g).max()) > 0 for p, g in grads.items()
               if p[0].startswith("controlnet_") and p[-1] == "kernel" and "cond_embedding" not in p[0])
    grads = traverse_util.flatten_dict(grad(_perturb(cp, _zero_init, 4)))
    dead = ["/".join(p) for p, g in grads.items() if not float(jnp.abs(g).max()) > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_unsupported_controlnet_config_is_refused():
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ControlModule.from_config({**UNET, "controlnet_conditioning_channel_order": "bgr"})
    control = ControlModule.from_unet_config(UNET, conditioning_channels=COND)
    z, t, ctx, lq = map(jnp.asarray, _inputs())
    with pytest.raises(ValueError, match="controlnet_cond has shape"):
        jax.eval_shape(control.init, jax.random.PRNGKey(0), z, t, ctx, lq[:, :16, :16])


# ---------------------------------------------------------------- parity with diffusers
def test_loaded_diffusers_controlnet_matches_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffrestorer_jax.convert.control import load_control

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    ref = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND).eval()
    with torch.no_grad():  # re-randomise the zero-initialised parts so the comparison can fail
        for name, p in ref.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = str(tmp_path / "controlnet")
    ref.save_pretrained(folder, safe_serialization=True)

    z, t, ctx, lq = _inputs()
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    zt, lqt = nchw(z), nchw(lq)
    module, params = load_control(folder)
    film_module, film_params = load_control(folder, use_film=True)
    # with FiLM: the same loaded params plus zero (identity, see the FiLM test) film_i params
    assert film_module.use_film and sorted(film_params) == sorted(list(params) + ["film_0", "film_1"])
    assert all(float(jnp.abs(x).max()) == 0.0 for k in ("film_0", "film_1") for x in jax.tree.leaves(film_params[k]))
    jax.tree.map(np.testing.assert_array_equal, {k: film_params[k] for k in params}, params)
    apply = jax.jit(module.apply)
    for scale in (1.0, 0.5, 1.7):
        with torch.no_grad():
            down_ref, mid_ref = ref(zt, torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                                    controlnet_cond=lqt, conditioning_scale=scale, return_dict=False)
        down, mid = apply({"params": params}, jnp.asarray(z), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(lq),
                          control_scale=jnp.float32(scale))
        assert len(down) == len(down_ref) == 6
        for ours, theirs in zip(down + (mid,), tuple(down_ref) + (mid_ref,)):
            r = theirs.numpy().transpose(0, 2, 3, 1)
            err = np.abs(np.asarray(ours) - r).max()
            assert err <= 1e-4 * np.abs(r).max(), (scale, err, np.abs(r).max())
