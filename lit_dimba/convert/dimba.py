"""Import the released Dimba's weights (feizc/Dimba, e.g. ``dimba-l-512.pt``) as a ``Backbone``: PixArt-alpha
blocks, each (or, with ``mamba_ratio`` < 1, some) followed by the release's Mamba block
(``after_each_block: [bimamba]``, ``lit_dimba.models.backbone.BiMambaBlock``).

What was read (feizc/Dimba at 05e20a7): ``diffusion/utils/checkpoint.py`` ``save_checkpoint`` writes
``{"state_dict": model.state_dict(), "state_dict_ema": ... (when training with EMA), "optimizer": ..., ...}`` and
``scripts/inference.py`` loads ``state_dict["state_dict"]``; the names are those of
``diffusion/model/nets/dimba.py`` ``Dimba``:

- ``blocks.<i>.*``: the ``depth`` PixArt blocks (``DimbaBlock``: ``attn.qkv``, ``attn.proj``, ``cross_attn.*``,
  ``mlp.fc1``/``fc2``, ``scale_shift_table``), PixArt-alpha's names;
- ``mamba_blocks.<j>.mixer.*`` (Vision Mamba's ``Mamba(bimamba_type="v2")``: ``in_proj``, ``conv1d``, ``x_proj``,
  ``dt_proj``, ``A_log``, ``D``, their ``_b`` twins, ``out_proj``) and ``mamba_blocks.<j>.norm.weight``
  (RMSNorm): the ``int(mamba_ratio * depth)`` Mamba blocks, a list of their own;
- the embedders and the final layer under PixArt-alpha's names (``x_embedder``, ``t_embedder``, ``t_block``,
  ``y_embedder`` with its null caption ``y_embedding``, ``final_layer``; ``csize_embedder``/``ar_embedder`` with
  micro-conditioning), and the buffer ``pos_embed``, which the backbone recomputes (the release's forward
  recomputes it too).

Our backbone keeps one list in execution order, so ``blocks.<i>`` and ``mamba_blocks.<j>`` are renumbered into
it, and ``blocks.<i>.attn.`` becomes ``mixer.`` as for PixArt; every other name is kept. The architecture is read
from the tensors: depth, width, patch, learned sigma, text width and token count, micro-conditioning, the number
of Mamba blocks (-> ``mamba_ratio``) and their sizes (d_state, d_conv, expand, dt_rank). Not recorded: the heads
(both released sizes, Dimba_L_2 and Dimba_G_2, use 16) and the PE scale; the PE grid ``base_size`` is the side
of the stored ``pos_embed`` (32 for 512^2 models), and ``pe_interpolation`` defaults to base_size / 32 (the
release's inference script: 1 at 512^2, 2 at 1024^2).
"""

import math
import re

import torch

from lit_dimba.convert.pixart import backbone_config, conversion_problems
from lit_dimba.errors import ConfigError, describe_names
from lit_dimba.models.backbone import Backbone

DIMBA_HEADS = 16  # Dimba_L_2 (width 1152) and Dimba_G_2 (1408) both
MIXER = "mamba_blocks.0.mixer."
# Tensors the architecture is read from.
REQUIRED = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.y_embedding", "blocks.0.mlp.fc1.weight",
            MIXER + "in_proj.weight", MIXER + "A_log", MIXER + "dt_proj.weight", MIXER + "conv1d.weight")


def is_dimba(state: dict[str, torch.Tensor]) -> bool:
    """True for the released Dimba's tensors (they have Mamba blocks, ``mamba_blocks.*``)."""
    return any(name.startswith("mamba_blocks.") for name in state)


def dimba_config(state: dict[str, torch.Tensor], source: str, num_heads: int | None = None,
                 base_size: int | None = None, pe_interpolation: float | None = None) -> dict:
    """Our ``Backbone`` arguments for the release's tensors (``state``, its own names, read from ``source``), sizes
    read from their shapes; ``num_heads``, ``base_size`` and ``pe_interpolation`` override what is assumed or read
    (module docstring)."""
    absent = [name for name in REQUIRED if name not in state]
    if absent:
        raise ConfigError(f"{source!r}: these Dimba weights lack {describe_names(absent)}, which every Dimba "
                          "checkpoint has")
    if base_size is None:
        pos_embed = state.get("pos_embed")  # (1, base_size ** 2, width)
        base_size = math.isqrt(pos_embed.shape[1]) if pos_embed is not None else 32
    config = backbone_config(state, num_heads or DIMBA_HEADS, base_size, pe_interpolation or base_size / 32)
    depth, hidden = config["depth"], config["hidden_size"]
    mamba_blocks = len({name.split(".")[1] for name in state if name.startswith("mamba_blocks.")})
    d_inner, d_state = state[MIXER + "A_log"].shape
    in_proj = tuple(state[MIXER + "in_proj.weight"].shape)
    if in_proj != (2 * d_inner, hidden) or d_inner % hidden:
        raise ConfigError(f"{source!r}: the Mamba blocks' in_proj is {in_proj}, not (2 * expand * {hidden}, {hidden}) "
                          f"with A_log {(d_inner, d_state)}: not the released Dimba's")
    mamba1 = dict(d_state=d_state, d_conv=state[MIXER + "conv1d.weight"].shape[-1], expand=d_inner // hidden,
                  dt_rank=state[MIXER + "dt_proj.weight"].shape[1])
    return {**config, "after_each_block": ["bimamba"], "mamba_ratio": mamba_blocks / depth, "mamba1": mamba1}


def _renamed(name: str, prefixes: dict[str, str]) -> str:
    """``name`` with its block prefix (``blocks.<i>.attn.``, else ``blocks.<i>.``; ``mamba_blocks.<j>.`` alike)
    replaced by ``prefixes``; unchanged if it has none of them."""
    match = re.match(r"((?:mamba_)?blocks\.\d+\.)(attn\.|mixer\.)?", name)
    for prefix in (match.group(0), match.group(1)) if match else ():
        if prefix in prefixes:
            return prefixes[prefix] + name[len(prefix):]
    return name


def convert_dimba_state(state: dict[str, torch.Tensor], source: str, num_heads: int | None = None,
                        base_size: int | None = None, pe_interpolation: float | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """The release's tensors (its names) -> (our backbone tensors, ``Backbone`` arguments).

    Every tensor must find its place and every backbone tensor must be filled, with the same shape: otherwise a
    ConfigError names them by the release's names (``source`` says which file).
    """
    config = dimba_config(state, source, num_heads, base_size, pe_interpolation)
    try:
        with torch.device("meta"):  # where each block goes, and every tensor's name and shape, nothing allocated
            backbone = Backbone.from_config(config)
    except ConfigError as error:
        raise ConfigError(f"{source!r} holds {round(config['mamba_ratio'] * config['depth'])} Mamba blocks for "
                          f"{config['depth']} PixArt blocks, which the released Dimba cannot arrange: {error}"
                          ) from error
    kinds = backbone.block_kinds
    pixart = [k for k, kind in enumerate(kinds) if kind != "bimamba"]
    mamba = [k for k, kind in enumerate(kinds) if kind == "bimamba"]
    to_ours = {f"blocks.{i}.attn.": f"blocks.{k}.mixer." for i, k in enumerate(pixart)}
    to_ours.update({f"blocks.{i}.": f"blocks.{k}." for i, k in enumerate(pixart)})
    to_ours.update({f"mamba_blocks.{j}.": f"blocks.{k}." for j, k in enumerate(mamba)})
    to_theirs = {ours: theirs for theirs, ours in to_ours.items()}

    converted = {_renamed(name, to_ours): tensor for name, tensor in state.items() if name != "pos_embed"}
    expected = backbone.state_dict()
    missing = [_renamed(name, to_theirs) for name in expected if name not in converted]
    unknown = [_renamed(name, to_theirs) for name in converted if name not in expected]
    shapes = [f"{_renamed(name, to_theirs)} {tuple(tensor.shape)} (expected {tuple(expected[name].shape)})"
              for name, tensor in converted.items() if name in expected and tensor.shape != expected[name].shape]
    problems = conversion_problems(missing, unknown, "the released Dimba's", shapes)
    if problems:
        raise ConfigError(f"{source!r}: these Dimba weights do not convert ({config['depth']} PixArt blocks and "
                          f"{len(mamba)} Mamba blocks read from them): {problems}")
    return converted, config
