"""Our degradation-aware decoder written in PyTorch around a diffusers `AutoencoderKL`, so that the
PyTorch restore reference (`torch_restore.py`) can do the same decoding work as ours.

Same layers, shapes and order as `diffrestorer_jax.models.decoder.DegradationAwareDecoder`: the
SD VAE's post_quant_conv and decoder, and after each decoder level's resnets (before its upsampler)
F <- F_dec + w * conv_out(RDB(FiLM(conv_in(cat(F_enc, F_dec))))), F_enc the VAE encoder's feature
of that level; optionally one more fusion of the decoded image with the LQ image. `load_from_jax`
copies our parameters in; tests/parity/test_torch_decoder.py checks that both give the same image.
Diffusers has no such decoder; this module exists for the benchmarks only.
"""
import numpy as np
import torch
from torch import nn


class ResidualDenseBlock(nn.Module):
    """x + 0.2 * conv_n(cat(x, x_1, ..)), x_j = lrelu_0.2(conv_j(cat(x, .., x_{j-1})))."""

    def __init__(self, channels: int, growth: int, num_convs: int):
        super().__init__()
        ins = [channels + j * growth for j in range(num_convs)]
        self.convs = nn.ModuleList([nn.Conv2d(ins[j], growth, 3, padding=1) for j in range(num_convs - 1)]
                                   + [nn.Conv2d(ins[-1], channels, 3, padding=1)])

    def forward(self, x):
        feats = [x]
        for conv in self.convs[:-1]:
            feats.append(nn.functional.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.convs[-1](torch.cat(feats, 1))


class LevelFusion(nn.Module):
    """(F_dec, F_enc, pooled P_D, w) -> F_dec + w * conv_out(RDB(FiLM(conv_in(cat(F_enc, F_dec)))))."""

    def __init__(self, channels: int, enc_channels: int, pooled_dim: int, growth: int, num_convs: int,
                 width: int = 0):
        super().__init__()
        width = width or channels
        self.conv_in = nn.Conv2d(enc_channels + channels, width, 3, padding=1)
        self.film = nn.Linear(pooled_dim, 2 * width)
        self.rdb = ResidualDenseBlock(width, growth, num_convs)
        self.conv_out = nn.Conv2d(width, channels, 1)

    def forward(self, f_dec, f_enc, pooled, weight):
        h = self.conv_in(torch.cat([f_enc, f_dec], 1))
        scale, shift = self.film(pooled).chunk(2, dim=-1)
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return f_dec + weight * self.conv_out(self.rdb(h))


class DegradationAwareDecoder(nn.Module):
    """decode(z (scaled latents, NCHW), lq (NCHW in [0, 1]), pooled P_D [N, D]) -> image in [0, 1].

    Runs the VAE encoder on the LQ for its per-level features (hooks on each down block's last
    resnet), then the fused decoder, as `models.diffrestorer.lq_features` + `decode` do."""

    def __init__(self, vae, pooled_dim: int, growth: int, num_convs: int, image_fusion_width: int = 0,
                 image_fusion_base: str = "decoder"):
        super().__init__()
        if image_fusion_base != "decoder":
            raise ValueError("torch_decoder: only image_fusion_base='decoder' is written here")
        self.vae = vae
        chans = list(vae.config.block_out_channels)
        self.fusions = nn.ModuleList([LevelFusion(c, c, pooled_dim, growth, num_convs) for c in reversed(chans)])
        self.image_fusion = (LevelFusion(vae.config.out_channels, vae.config.in_channels, pooled_dim, growth,
                                         num_convs, width=image_fusion_width) if image_fusion_width else None)

    def lq_features(self, lq):
        feats = []
        hooks = [b.resnets[-1].register_forward_hook(lambda m, i, o: feats.append(o))
                 for b in self.vae.encoder.down_blocks]
        try:
            self.vae.encode(lq * 2 - 1)
        finally:
            for h in hooks:
                h.remove()
        return feats

    def forward(self, z, lq, pooled, fidelity_weight: float = 1.0):
        feats = self.lq_features(lq)
        dec = self.vae.decoder
        h = self.vae.post_quant_conv(z / self.vae.config.scaling_factor)
        h = dec.mid_block(dec.conv_in(h))
        for k, block in enumerate(dec.up_blocks):
            for resnet in block.resnets:
                h = resnet(h, None)
            h = self.fusions[k](h, feats[len(feats) - 1 - k], pooled, fidelity_weight)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h)
        out = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
        if self.image_fusion is not None:
            out = self.image_fusion(out, lq * 2 - 1, pooled, fidelity_weight)
        return ((out + 1) / 2).clamp(0, 1)


def build(vae, model):
    """The decoder for a config's `model` section around `vae` (a diffusers AutoencoderKL)."""
    d = model.decoder
    return DegradationAwareDecoder(vae, model.unet["cross_attention_dim"], d["rdb_growth"], d["rdb_convs"],
                                   int(d.get("image_fusion_width", 0)), str(d.get("image_fusion_base", "decoder")))


def load_from_jax(module: DegradationAwareDecoder, fusion_params):
    """Copy our decoder's fusion parameters (`params['decoder']`'s 'fusions_k' / 'image_fusion'
    subtrees, numpy or JAX arrays) into `module` (the VAE's own weights are left as they are)."""
    def conv(m, p):
        m.weight.data = torch.from_numpy(np.ascontiguousarray(np.asarray(p["kernel"]).transpose(3, 2, 0, 1)))
        m.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    def fusion(m, p):
        conv(m.conv_in, p["conv_in"])
        conv(m.conv_out, p["conv_out"])
        m.film.weight.data = torch.from_numpy(np.ascontiguousarray(np.asarray(p["film"]["kernel"]).T))
        m.film.bias.data = torch.from_numpy(np.asarray(p["film"]["bias"]).copy())
        for j, c in enumerate(m.rdb.convs):
            conv(c, p["rdb"][f"conv{j + 1}"])
    for k, m in enumerate(module.fusions):
        fusion(m, fusion_params[f"fusions_{k}"])
    if module.image_fusion is not None:
        fusion(module.image_fusion, fusion_params["image_fusion"])
