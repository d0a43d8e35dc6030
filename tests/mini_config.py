"""configs/tiny.py one level shallower everywhere: the same program structure at half the size, for
tests that compile whole train steps (XLA's TPU compiler takes minutes for the full tiny step on a
2-core host)."""


def mini_tiny(stage: str = "stage1"):
    from configs.tiny import get_config
    c = get_config(stage)
    c.model.unet = dict(c.model.unet, down_block_types=("CrossAttnDownBlock2D",),
                        up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(32,))
    c.model.vae = dict(c.model.vae, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32))
    c.model.control = dict(c.model.control, conditioning_channels=(8, 16))
    c.model.clip = dict(c.model.clip, num_hidden_layers=1)
    return c
