"""Degradation-aware decoder: equals the SD VAE decode at init, the fidelity weight acts, grads flow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from diffrestorer_jax.models.decoder import DegradationAwareDecoder, init_decoder_from_vae
from diffrestorer_jax.models.vae import AutoencoderKL

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 3,
           up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
           norm_num_groups=4, scaling_factor=0.5)
P_D = 12


def _perturb(params, pred, seed, scale=0.1):
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)  # numpy noise: no per-shape compilation
    return traverse_util.unflatten_dict(
        {p: (jnp.asarray(np.asarray(v) + scale * rng.standard_normal(v.shape).astype(v.dtype)) if pred(p) else v)
         for p, v in flat.items()})


def _fusion(path):
    return path[0].startswith("fusions_")


@pytest.fixture(scope="module")
def setup():
    vae = AutoencoderKL.from_config(VAE)
    dec = DegradationAwareDecoder.from_vae_config(VAE, rdb_growth=4, rdb_convs=3)
    rng = np.random.default_rng(0)
    lq = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32))
    vae_params = jax.jit(vae.init)(jax.random.PRNGKey(0), lq)["params"]
    vae_params = meta.unbox(_perturb(meta.unbox(vae_params), lambda p: True, 9, 0.02))
    mean, _, feats = jax.jit(lambda p, x: vae.apply({"params": p}, x, return_features=True, method="encode"))(
        vae_params, lq)
    z = mean + jnp.asarray(rng.standard_normal(mean.shape).astype(np.float32))  # not the LQ's own latent
    pooled = jnp.asarray(rng.standard_normal((2, P_D)).astype(np.float32))
    dec_params = jax.jit(dec.init)(jax.random.PRNGKey(1), z, feats, pooled)["params"]
    dec_params = meta.unbox(init_decoder_from_vae(dec_params, vae_params))
    # jitted like the decoder, so both run the same compiled arithmetic (eager op-by-op differs by ulps)
    plain = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="decode"))(vae_params, z)
    return dec, dec_params, vae_params, z, feats, pooled, plain


def test_init_equals_vae_decode_for_any_fidelity_weight(setup):
    dec, params, vae_params, z, feats, pooled, plain = setup
    assert [k for k in params if k.startswith("fusions_")] == ["fusions_0", "fusions_1", "fusions_2"]
    jax.tree.map(np.testing.assert_array_equal, params["decoder"], vae_params["decoder"])
    apply = jax.jit(dec.apply)
    for w in (1.0, 0.0, 2.5, jnp.array([0.3, 1.0])):
        out = apply({"params": params}, z, feats, pooled, fidelity_weight=w)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))


def test_trained_fusion_changes_the_output_and_weight_zero_restores_the_vae(setup):
    dec, params, _, z, feats, pooled, plain = setup
    moved = _perturb(params, _fusion, 2)
    apply = jax.jit(dec.apply)
    out1 = apply({"params": moved}, z, feats, pooled, fidelity_weight=1.0)
    out_half = apply({"params": moved}, z, feats, pooled, fidelity_weight=0.5)
    out0 = apply({"params": moved}, z, feats, pooled, fidelity_weight=0.0)
    assert float(jnp.abs(out1 - plain).max()) > 1e-3
    assert float(jnp.abs(out_half - out1).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(plain))
    per_example = apply({"params": moved}, z, feats, pooled, fidelity_weight=jnp.array([0.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(per_example[0]), np.asarray(plain[0]))
    np.testing.assert_allclose(np.asarray(per_example[1]), np.asarray(out1[1]), atol=1e-6)
    # the degradation embedding modulates the fusion
    other = apply({"params": moved}, z, feats, -pooled, fidelity_weight=1.0)
    assert float(jnp.abs(other - out1).max()) > 1e-5


def test_gradients_reach_every_parameter(setup):
    dec, params, _, z, feats, pooled, _ = setup
    target = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 16, 3))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(dec.apply({"params": p}, z, feats, pooled) * target)))

    grads = traverse_util.flatten_dict(grad(params))  # at init: the zero convs learn
    assert all(float(jnp.abs(g).max()) > 0 for p, g in grads.items() if p[0].startswith("fusions_")
               and p[1] == "conv_out" and p[-1] == "kernel")
    grads = traverse_util.flatten_dict(grad(_perturb(params, _fusion, 3)))
    dead = ["/".join(p) for p, g in grads.items() if not float(jnp.abs(g).max()) > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_mismatched_features_are_refused(setup):
    dec, params, _, z, feats, pooled, _ = setup
    with pytest.raises(ValueError, match="LQ feature maps"):
        jax.eval_shape(dec.apply, {"params": params}, z, feats[:2], pooled)
    with pytest.raises(ValueError, match=r"lq_features\[0\] has shape"):
        jax.eval_shape(dec.apply, {"params": params}, z, [f[:, :-2] if i == 0 else f for i, f in enumerate(feats)],
                       pooled)


@pytest.fixture(scope="module")
def image_fusion_setup(setup):
    """The same decoder with the optional image-level fusion (the LQ image itself as F_enc)."""
    _, _, vae_params, z, feats, pooled, plain = setup
    dec = DegradationAwareDecoder.from_vae_config(VAE, rdb_growth=4, rdb_convs=3, image_fusion_width=6)
    lq = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, plain.shape).astype(np.float32))
    params = jax.jit(dec.init)(jax.random.PRNGKey(1), z, feats, pooled, lq_image=lq)["params"]
    params = meta.unbox(init_decoder_from_vae(params, vae_params))
    return dec, params, z, feats, pooled, plain, lq


def test_image_fusion_starts_as_the_vae_decode_and_uses_the_lq_image(image_fusion_setup):
    dec, params, z, feats, pooled, plain, lq = image_fusion_setup
    assert params["image_fusion"]["conv_in"]["kernel"].shape == (3, 3, 6, 6)
    apply = jax.jit(dec.apply)
    for w in (1.0, 0.0):
        out = apply({"params": params}, z, feats, pooled, fidelity_weight=w, lq_image=lq)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    moved = _perturb(params, lambda p: p[0] == "image_fusion", 6)
    out = apply({"params": moved}, z, feats, pooled, lq_image=lq)
    assert float(jnp.abs(out - plain).max()) > 1e-3
    other = apply({"params": moved}, z, feats, pooled, lq_image=-lq)
    assert float(jnp.abs(other - out).max()) > 1e-3  # the output depends on the LQ pixels
    out0 = apply({"params": moved}, z, feats, pooled, fidelity_weight=0.0, lq_image=lq)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(plain))


def test_image_fusion_refuses_a_missing_or_misshapen_lq_image(image_fusion_setup):
    dec, params, z, feats, pooled, _, lq = image_fusion_setup
    with pytest.raises(ValueError, match="needs lq_image"):
        jax.eval_shape(dec.apply, {"params": params}, z, feats, pooled)
    with pytest.raises(ValueError, match="lq_image has shape"):
        jax.eval_shape(dec.apply, {"params": params}, z, feats, pooled, lq_image=lq[:, :-4])


def test_lq_based_image_fusion_starts_as_the_lq_image_and_corrects_it_from_the_latent(image_fusion_setup):
    """image_fusion_base='lq': LQ + w * correction(decoded, LQ); the LQ image at init and at w = 0."""
    _, params, z, feats, pooled, plain, lq = image_fusion_setup
    dec = DegradationAwareDecoder.from_vae_config(VAE, rdb_growth=4, rdb_convs=3, image_fusion_width=6,
                                                  image_fusion_base="lq")
    apply = jax.jit(dec.apply)
    for w in (1.0, 0.0):  # same parameter tree as the default base
        out = apply({"params": params}, z, feats, pooled, fidelity_weight=w, lq_image=lq)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(lq))
    moved = _perturb(params, lambda p: p[0] == "image_fusion", 6)
    out = apply({"params": moved}, z, feats, pooled, lq_image=lq)
    assert float(jnp.abs(out - lq).max()) > 1e-3
    other_latent = apply({"params": moved}, -z, feats, pooled, lq_image=lq)
    assert float(jnp.abs(other_latent - out).max()) > 1e-3  # the correction sees the decoded latent
    out0 = apply({"params": moved}, z, feats, pooled, fidelity_weight=0.0, lq_image=lq)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(lq))
    with pytest.raises(ValueError, match="image_fusion_base must be"):
        bad = DegradationAwareDecoder.from_vae_config(VAE, image_fusion_width=6, image_fusion_base="image")
        jax.eval_shape(bad.apply, {"params": params}, z, feats, pooled, lq_image=lq)
