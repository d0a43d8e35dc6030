"""The PyTorch reference restore that the restore benchmarks time beside ours, built from diffusers
and transformers parts with random weights (timing does not depend on them):

    run = torch_restore.build(config.model, device="cpu", dtype=torch.float32)
    images = run(lq_nchw, steps)      # [N, 3, H, W] in [0, 1] -> [N, 3, H, W]

CLIP vision tower on the LQ resized to the CLIP size, the two prompt MLPs (P_S, P_D), then per DDIM
step ControlNet (from the UNet, context P_D, the LQ as its condition) + UNet (context P_S, the
residuals), then the decoding: `decoder='vae'` the VAE encoder on the LQ (`encode_lq`: the features
our degradation-aware decoder fuses) and the plain VAE decoder on the latent; `decoder='aware'` our
degradation-aware decoder written in PyTorch (`torch_decoder.py`: the VAE encoder's features fused
into the VAE decoder at every level), the same decoding work as ours.
"""
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build(model, device: str = "cpu", dtype=None, encode_lq: bool = True, decoder: str = "vae"):
    """`model`: a config's `model` section. Returns run(lq, steps) under torch.no_grad()."""
    if decoder not in ("vae", "aware"):
        raise ValueError(f"decoder must be 'vae' or 'aware', got {decoder!r}")
    import diffusers
    import torch
    import torch_decoder
    import transformers
    dtype = dtype or torch.float32
    unet_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.unet).items()}
    vae_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.vae).items()}
    cc = dict(model.clip)
    ctx, hid = unet_cfg["cross_attention_dim"], model.prompt["hidden_dim"]
    nn = torch.nn
    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the card: the CPU init of SD 1.5 is slow
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        control = diffusers.ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(model.control["conditioning_channels"]))
        vae = diffusers.AutoencoderKL(**vae_cfg)
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=cc["hidden_size"], intermediate_size=cc["intermediate_size"],
            num_hidden_layers=cc["num_hidden_layers"], num_attention_heads=cc["num_attention_heads"],
            image_size=cc["image_size"], patch_size=cc["patch_size"], hidden_act=cc["hidden_act"],
            attn_implementation="sdpa"))
        sem = nn.Sequential(nn.Linear(cc["hidden_size"], hid), nn.LayerNorm(hid), nn.LeakyReLU(0.01),
                            nn.Linear(hid, hid), nn.LayerNorm(hid), nn.LeakyReLU(0.01), nn.Linear(hid, ctx))
        deg = nn.Sequential(nn.Linear(cc["hidden_size"], hid), nn.LayerNorm(hid), nn.LeakyReLU(0.01),
                            nn.Linear(hid, ctx))
        aware = torch_decoder.build(vae, model) if decoder == "aware" else None
    for mod in (unet, control, vae, clip, sem, deg) + ((aware,) if aware is not None else ()):
        if dtype != torch.float32:  # (built in float32 on `device`)
            mod.to(dtype)
        mod.eval()
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    mean = torch.tensor(CLIP_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device, dtype=dtype).view(1, 3, 1, 1)

    @torch.no_grad()
    def run(lq, steps: int):
        px = torch.nn.functional.interpolate(lq, size=(cc["image_size"],) * 2, mode="bicubic", antialias=True)
        tok = clip(pixel_values=(px - mean) / std).last_hidden_state[:, 1:]
        p_s, p_d = sem(tok), deg(tok)
        z = torch.randn(lq.shape[0], vae_cfg["latent_channels"], lq.shape[2] // f, lq.shape[3] // f,
                        device=device, dtype=dtype)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            down, mid = control(z, t, p_d, controlnet_cond=lq, return_dict=False)
            eps = unet(z, t, p_s, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       return_dict=False)[0]
            z = sched.step(eps, t, z, return_dict=False)[0]
        if aware is not None:  # encodes the LQ itself, for the features it fuses
            img = aware(z, lq, p_d.mean(1))
        else:
            if encode_lq:
                vae.encode(lq * 2 - 1)
            img = vae.decode(z / vae_cfg["scaling_factor"], return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return img
    return run


def nchw(lq_nhwc: np.ndarray, device: str = "cpu", dtype=None):
    import torch
    return torch.from_numpy(np.ascontiguousarray(lq_nhwc.transpose(0, 3, 1, 2))).to(device, dtype or torch.float32)
