"""The PyTorch degradation-aware decoder that the restore benchmarks run beside ours
(benchmarks/torch_decoder.py) computes what ours computes: same weights, same image."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from benchmarks import torch_decoder  # noqa: E402
from diffrestorer_jax.convert.vae import load_vae  # noqa: E402
from diffrestorer_jax.models.decoder import DegradationAwareDecoder, init_decoder_from_vae  # noqa: E402

VAE = dict(block_out_channels=(8, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           sample_size=32, scaling_factor=0.5)
P_D, GROWTH, CONVS, IMAGE_WIDTH = 12, 4, 3, 8


def _randomized(params, seed):
    """Every fusion parameter random (the zero-initialised convs and FiLM would hide a wrong wiring)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        p: (np.asarray(v) + 0.2 * rng.standard_normal(v.shape).astype(np.float32)
            if p[0].startswith(("fusions_", "image_fusion")) else v) for p, v in flat.items()})


@pytest.mark.parametrize("image_fusion_width", [0, IMAGE_WIDTH])
def test_torch_decoder_equals_ours(tmp_path, image_fusion_width):
    torch.manual_seed(0)
    vae_ref = diffusers.AutoencoderKL(**VAE).eval()
    vae_ref.save_pretrained(str(tmp_path / "vae"))
    vae, vae_params = load_vae(str(tmp_path / "vae"))
    ours = DegradationAwareDecoder.from_vae_config(dict(VAE), rdb_growth=GROWTH, rdb_convs=CONVS,
                                                   image_fusion_width=image_fusion_width)
    rng = np.random.default_rng(1)
    lq = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    pooled = rng.standard_normal((2, P_D)).astype(np.float32)
    _, _, feats = vae.apply({"params": vae_params}, lq * 2 - 1, return_features=True, method="encode")
    lq_image = lq * 2 - 1 if image_fusion_width else None
    params = meta.unbox(jax.jit(ours.init)(jax.random.PRNGKey(0), z, feats, pooled, lq_image=lq_image))["params"]
    params = _randomized(init_decoder_from_vae(params, vae_params), 2)

    @jax.jit
    def decode(params, z, lq, pooled):  # models.diffrestorer.lq_features + decode
        _, _, feats = vae.apply({"params": vae_params}, lq * 2 - 1, return_features=True, method="encode")
        img = ours.apply({"params": params}, z / VAE["scaling_factor"], feats, pooled, fidelity_weight=0.7,
                         lq_image=lq * 2 - 1 if image_fusion_width else None)
        return jnp.clip((img + 1) / 2, 0, 1)
    want = np.asarray(decode(params, z, lq, pooled))

    theirs = torch_decoder.DegradationAwareDecoder(vae_ref, P_D, GROWTH, CONVS, image_fusion_width).eval()
    torch_decoder.load_from_jax(theirs, params)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        got = theirs(nchw(z), nchw(lq), torch.from_numpy(pooled), 0.7).numpy().transpose(0, 2, 3, 1)
        plain = ((vae_ref.decode(nchw(z) / VAE["scaling_factor"]).sample + 1) / 2).clamp(0, 1).numpy()
    assert np.abs(want - plain.transpose(0, 2, 3, 1)).max() > 1e-2  # the fusions do change the image
    np.testing.assert_allclose(got, want, atol=2e-5)
