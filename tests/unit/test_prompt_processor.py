"""The Visual Prompt Processor equals its PyTorch definition (loaded through our converter)."""
import jax
import numpy as np
import torch
from safetensors.torch import save_file

from diffrestorer_jax.convert.core import StateDict, abstract_params, load_into
from diffrestorer_jax.models.prompt_processor import VisualPromptProcessor


def torch_mlp(widths, in_dim):
    layers = []
    for i, w in enumerate(widths):
        layers.append(torch.nn.Linear(in_dim, w))
        if i < len(widths) - 1:
            layers += [torch.nn.LayerNorm(w), torch.nn.LeakyReLU()]
        in_dim = w
    return torch.nn.Sequential(*layers)


class TorchPromptProcessor(torch.nn.Module):
    """The paper's heads written plainly in PyTorch: the reference our Flax module must equal."""

    def __init__(self, clip_dim, hidden, context, cls_hidden, n_types=8):
        super().__init__()
        self.semantic = torch_mlp((hidden, hidden, context), clip_dim)
        self.degradation = torch_mlp((hidden, context), clip_dim)
        self.classifier = torch_mlp((cls_hidden, n_types), context)

    def forward(self, x):
        p_d = self.degradation(x)
        return self.semantic(x), p_d, self.classifier(p_d.mean(1))


def test_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    ref = TorchPromptProcessor(clip_dim=48, hidden=40, context=32, cls_hidden=24)
    with torch.no_grad():  # non-trivial LayerNorm affine so the eps/scale mapping is exercised
        for m in ref.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    save_file(ref.state_dict(), tmp_path / "pp.safetensors")

    module = VisualPromptProcessor(context_dim=32, hidden_dim=40, classifier_hidden_dim=24)
    x = np.random.default_rng(0).standard_normal((2, 6, 48)).astype(np.float32)
    params = load_into(abstract_params(module, x), StateDict(str(tmp_path / "pp.safetensors")))
    out = module.apply({"params": params}, x)
    with torch.no_grad():
        p_s, p_d, logits = ref(torch.from_numpy(x))
    for ours, theirs in ((out["semantic"], p_s), (out["degradation"], p_d), (out["logits"], logits)):
        theirs = theirs.numpy()
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max())


def test_shapes_and_param_names():
    module = VisualPromptProcessor(context_dim=16, hidden_dim=8, classifier_hidden_dim=8)
    x = np.zeros((3, 5, 12), np.float32)
    params = abstract_params(module, x)
    assert set(params) == {"semantic_0", "semantic_1", "semantic_3", "semantic_4", "semantic_6",
                           "degradation_0", "degradation_1", "degradation_3",
                           "classifier_0", "classifier_1", "classifier_3"}
    out = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), x)[0])
    assert out["semantic"].shape == (3, 5, 16) and out["logits"].shape == (3, 8)
