"""CLIP vision tower: parity with transformers on tiny random models, loading HF and OpenAI formats,
preprocessing, and clear errors for wrong checkpoints."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from diffrestorer_jax.convert.clip import load_clip_vision  # noqa: E402
from diffrestorer_jax.convert.core import CheckpointError  # noqa: E402
from diffrestorer_jax.models.clip_vision import (CLIPVisionTransformer, PRESETS,  # noqa: E402
                                                 preprocess)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            patch_size=8, image_size=32, projection_dim=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            projection_dim=16, vocab_size=100, max_position_embeddings=16)


def _randomise(model, seed):
    """Perturb every parameter (layer norms too) so a swapped or mis-oriented tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _build(kind, act, seed=0):
    vc = transformers.CLIPVisionConfig(hidden_act=act, **TINY)
    if kind == "vision":
        return _randomise(transformers.CLIPVisionModel(vc), seed)
    if kind == "vision_proj":
        return _randomise(transformers.CLIPVisionModelWithProjection(vc), seed)
    cfg = transformers.CLIPConfig(text_config=transformers.CLIPTextConfig(**TEXT).to_dict(),
                                  vision_config=vc.to_dict(), projection_dim=16)
    return _randomise(transformers.CLIPModel(cfg), seed)


def _reference(model, pixels_nchw):
    """(last_hidden_state, pooled, hidden_states, image_embeds or None) from the PyTorch model."""
    with torch.no_grad():
        if isinstance(model, transformers.CLIPModel):
            out = model.vision_model(pixel_values=pixels_nchw, output_hidden_states=True)
            embeds = model.visual_projection(out.pooler_output)
        elif isinstance(model, transformers.CLIPVisionModelWithProjection):
            vout = model.vision_model(pixel_values=pixels_nchw, output_hidden_states=True)
            embeds = model(pixel_values=pixels_nchw).image_embeds
            out = vout
        else:
            out = model(pixel_values=pixels_nchw, output_hidden_states=True)
            embeds = None
    to_np = lambda t: t.numpy()
    return (to_np(out.last_hidden_state), to_np(out.pooler_output),
            [to_np(h) for h in out.hidden_states], None if embeds is None else to_np(embeds))


def _close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-4 * scale, f"{what}: max abs err {err:.3g} > 1e-4 x max|ref| ({scale:.3g})"


def _pixels(seed=0, n=2):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _compare(module, params, model, x):
    last, pooled, states, embeds = _reference(model, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    def run(p, x):  # one compilation for everything compared
        e = module.apply(p, x, method="image_embeds") if module.with_projection else None
        return module.apply(p, x), e

    (our_last, our_pooled, our_states), our_embeds = jax.jit(run)({"params": params}, x)
    _close(our_last, last, "last_hidden_state")
    _close(our_pooled, pooled, "pooled")
    assert len(our_states) == len(states) == TINY["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(our_states, states)):
        _close(a, b, f"hidden_states[{i}]")
    if embeds is not None:
        _close(our_embeds, embeds, "image_embeds")
    return module


@pytest.mark.parametrize("kind,act", [("vision", "quick_gelu"), ("vision_proj", "gelu"),
                                      ("clip", "quick_gelu")])
def test_hf_parity(tmp_path, kind, act):
    model = _build(kind, act)
    model.save_pretrained(tmp_path)
    module, params = load_clip_vision(str(tmp_path))
    assert module.hidden_act == act and module.with_projection == (kind != "vision")
    _compare(module, params, model, _pixels())


def test_hf_old_prefixed_pickle(tmp_path):
    """transformers-4 layout: `vision_model.*` keys, a position_ids buffer, pytorch_model.bin."""
    model = _build("vision", "quick_gelu", seed=1)
    model.config.save_pretrained(tmp_path)
    sd = {f"vision_model.{k}": v for k, v in model.state_dict().items()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    module, params = load_clip_vision(str(tmp_path))
    _compare(module, params, model, _pixels(1))


def _to_openai(model):
    """A CLIPVisionModelWithProjection's weights under OpenAI CLIP names (fused qkv, proj (in, out)),
    plus a few text-tower keys that the loader must skip."""
    hf = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    sd = {"visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
          "visual.class_embedding": hf["embeddings.class_embedding"],
          "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
          "visual.proj": hf["visual_projection.weight"].T.contiguous(),
          "token_embedding.weight": torch.zeros(10, 8), "ln_final.weight": torch.ones(8),
          "logit_scale": torch.tensor(1.0)}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for leaf in ("weight", "bias"):
            sd[f"visual.{theirs}.{leaf}"] = hf[f"{ours}.{leaf}"]
    for i in range(TINY["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            sd[dst + f"attn.in_proj_{leaf}"] = torch.cat(
                [hf[src + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):
                sd[dst + f"{theirs}.{leaf}"] = hf[src + f"{ours}.{leaf}"]
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("act,suffix", [("quick_gelu", ".pt"), ("gelu", ".safetensors")])
def test_openai_format(tmp_path, act, suffix):
    model = _build("vision_proj", act, seed=2)
    f = str(tmp_path / f"clip{suffix}")
    sd = _to_openai(model)
    torch.save(sd, f) if suffix == ".pt" else save_file(sd, f)
    module, params = load_clip_vision(f, hidden_act=act, num_attention_heads=4)
    assert (module.hidden_size, module.patch_size, module.image_size, module.projection_dim) == (64, 8, 32, 16)
    _compare(module, params, model, _pixels(2))


def test_preprocess_matches_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    img = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(images=[img], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess(img[None] / 255.0, image_size=32)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_preprocess_resizes_whole_image_like_pil():
    """Shrinking a non-square image: no crop, and PIL-bicubic-with-antialias values."""
    from PIL import Image
    img = np.random.default_rng(4).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    ours = np.asarray(preprocess(img[None] / 255.0, image_size=32))[0]
    pil = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC), np.float32) / 255.0
    pil = (pil - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    # PIL rounds to uint8 (1/255/std ~ 0.015 in normalised units); allow that plus edge handling.
    assert np.abs(ours - pil).mean() < 0.02 and np.abs(ours - pil).max() < 0.15


def test_presets_build():
    m = CLIPVisionTransformer.from_preset("ViT-L/14")
    assert (m.hidden_size, m.num_hidden_layers, m.patch_size, m.hidden_act) == (1024, 24, 14, "quick_gelu")
    assert set(PRESETS) >= {"ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336", "ViT-H/14"}
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        CLIPVisionTransformer.from_preset("ViT-Q/3")


def test_error_text_only_checkpoint(tmp_path):
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="text model"):
        load_clip_vision(str(tmp_path / "hf"))
    save_file({"token_embedding.weight": torch.zeros(4, 4)}, str(tmp_path / "openai.safetensors"))
    with pytest.raises(CheckpointError, match="no `visual"):
        load_clip_vision(str(tmp_path / "openai.safetensors"))


def _saved_vision(tmp_path):
    _build("vision", "quick_gelu").save_pretrained(tmp_path / "ok")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    return bad


def test_error_wrong_shape(tmp_path):
    bad = _saved_vision(tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"wrong shape: .*mlp\.fc1\.weight.*\(128, 64\)"):
        load_clip_vision(str(bad))


def test_error_missing_key(tmp_path):
    bad = _saved_vision(tmp_path)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["encoder.layers.1.mlp.fc2.bias"]
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*\n.*missing.*encoder/layers_1/mlp/fc2/bias"):
        load_clip_vision(str(bad))
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_clip_vision(str(tmp_path / "nowhere"))


def test_sharded_equals_single_device(tmp_path):
    """On a 2x2x2 (data, fsdp, tensor) mesh of fake CPU devices, the rules' sharding changes nothing."""
    from diffrestorer_jax.convert.core import abstract_params
    from diffrestorer_jax.parallel.mesh import make_mesh
    from diffrestorer_jax.parallel.sharding import (batch_sharding, mesh_context, shard_tree,
                                                    tree_shardings)
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    _build("vision_proj", "quick_gelu", seed=5).save_pretrained(tmp_path)
    module, params = load_clip_vision(str(tmp_path))
    x = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype(np.float32)
    single = jax.jit(module.apply)({"params": params}, x)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with mesh_context(mesh):
        shardings = tree_shardings(abstract_params(module, jnp.zeros((1, 32, 32, 3))), mesh)
        sharded_params = shard_tree(params, shardings)
        assert sharded_params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        out = jax.jit(module.apply)({"params": sharded_params}, jax.device_put(x, batch_sharding(mesh, 4)))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_dtypes_come_from_the_caller_not_the_checkpoint(tmp_path):
    """A float16 checkpoint (config "dtype": "float16") loads as float32 unless a dtype is asked."""
    _build("vision", "quick_gelu").half().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("dtype") == "float16"
    module, params = load_clip_vision(str(tmp_path))
    assert module.dtype == jnp.float32 and {l.dtype for l in jax.tree.leaves(params)} == {np.dtype("float32")}
    module, params = load_clip_vision(str(tmp_path), dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16 and {l.dtype for l in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


def test_convert_cli_takes_an_open_clip_files_activation_and_heads(tmp_path, capsys):
    """diffrestorer-convert --clip on an open_clip file (GELU): --clip-act / --clip-heads reach the
    loader, and the conversion equals the reference; without --clip-act the assumed QuickGELU is said."""
    from diffrestorer_jax import convert
    from diffrestorer_jax.cli.convert import main as convert_main
    model = _build("vision_proj", "gelu", seed=3)
    f = tmp_path / "open_clip_pytorch_model.safetensors"
    save_file(_to_openai(model), str(f))
    out = tmp_path / "w"
    assert convert_main(["--clip", str(f), "--out", str(out), "--clip-act", "gelu", "--clip-heads", "4"]) == 0
    assert "does not say its activation" not in capsys.readouterr().err
    module, params = convert.load_clip_vision(str(out / "clip"))
    assert (module.hidden_act, module.num_attention_heads) == ("gelu", 4)
    _compare(module, params, model, _pixels(3))
    assert convert_main(["--clip", str(f), "--out", str(out), "--clip-heads", "4"]) == 0
    assert "QuickGELU (OpenAI's) is assumed: give --clip-act gelu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a Hugging Face folder says both itself
        convert_main(["--clip", str(tmp_path), "--out", str(out), "--clip-act", "gelu"])
