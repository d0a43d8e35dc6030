"""Default logical-axis rules: which mesh axes each logical name of `models/layers.py` maps to.

Why each rule:
  activation_batch  -> ('data', 'fsdp')  every data-parallel member (plain or fsdp) gets its own slice
                       of the batch; fsdp is data parallelism too, only its weights are split.
  embed, conv_in    -> 'fsdp'            the input dim of every big weight is split over fsdp, so the
                       UNet/ControlNet weights and their two Adam moments take 1/fsdp of the memory;
                       XLA all-gathers a layer's weight just before use (ZeRO-3).
  conv_out          -> 'tensor'          output channels are the natural model-parallel split of a conv.
  mlp, heads        -> 'tensor'          Megatron-style: the widening dense and the attention heads are
                       split so that each device computes whole heads / a slice of the hidden layer and
                       one reduction per block brings them back.
  norm              -> None              norm scales are tiny; replicating them costs nothing and
                       avoids a gather per normalisation.
  activation_height/width/length -> None spatial/sequence parallelism is not used (SD latents are small).
  activation_channels, activation_embed -> None activations stay whole in channels; weights were
                       gathered (fsdp) so the matmul output is replicated over fsdp anyway.
A mesh axis of size 1 makes its rule a no-op, so the same rules serve one CPU and a pod. A config can
override them with `config.logical_axis_rules = (('embed', 'fsdp'), ...)`; unlisted names are
replicated.
"""
from typing import Tuple, Union

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_length", None),
    ("activation_channels", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("norm", None),
)


def _normalise(value) -> MeshAxes:
    """Config files give lists (JSON round trips turn tuples into lists); Flax wants str/tuple/None."""
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


def get_rules(config=None) -> Rules:
    """The rules from `config.logical_axis_rules` (a sequence of (name, mesh axes) pairs) or defaults.

    Overrides replace the defaults name by name, so a config only lists what it changes.
    """
    override = None
    if config is not None:
        override = config.get("logical_axis_rules", None) if hasattr(config, "get") else config
    if not override:
        return DEFAULT_RULES
    overrides = {name: _normalise(axes) for name, axes in override}
    merged = [(name, overrides.pop(name, axes)) for name, axes in DEFAULT_RULES]
    merged += list(overrides.items())
    return tuple(merged)

