"""Import PixArt-alpha weights as a ``Backbone`` (layout ``dit``): the teacher T2MD distils.

Two formats are read, told apart by their tensor names:
- **original** (the PixArt-alpha repository's ``PixArt-XL-2-512x512.pth``, ``PixArt-XL-2-1024-MS.pth``): a
  ``torch.load`` file (read with ``weights_only=True``) holding ``{"state_dict": ...}`` or the tensors
  themselves, or a ``.safetensors`` file of them. Our names are PixArt's except ``attn`` -> ``mixer``.
- **diffusers** (``PixArtTransformer2DModel``): a folder with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (sharded or ``.bin`` too), or a pipeline folder with ``transformer/``.

The positional embedding is recomputed by the backbone, never loaded; the learned-sigma output channels and
1024-MS's size conditioning (``micro_conditioning``) are kept. Every tensor must be used and every backbone tensor
filled: anything else is an error naming the tensors.

The null caption (``y_embedding``, PixArt's learned "empty caption" for classifier-free guidance) is in both
released formats (diffusers keeps it as ``caption_projection.y_embedding``, which its own model does not use); a
folder written by diffusers' ``save_pretrained`` lacks it and is refused with that explanation.

The released Dimba's files share the original format and PixArt's names for everything but the Mamba blocks
(``lit_dimba.convert.dimba``); ``lit_dimba.convert.convert_released`` tells the two apart.

Command line: ``python -m lit_dimba.convert SOURCE OUT`` writes an export folder (``model.safetensors`` +
``backbone.yaml``) that ``init_weights``, ``teacher_checkpoint`` and ``lit_dimba.checkpoints`` read. Those options
also take the PixArt files directly: conversion is cheap, so it happens on load.

The way back (``write_diffusers``, ``python -m lit_dimba.export ... --diffusers OUT``) writes an all-attention
backbone as a diffusers folder, renaming through the same tables run backwards, with the null caption kept in the
weights file as in the hub's folders.
"""

import json
import os
import pickle
import re

import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file, save_file

from lit_dimba.errors import ConfigError, describe_names
from lit_dimba.models.backbone import Backbone

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The null caption: in the hub's weights files, but not a tensor of diffusers' model (its pipeline encodes "").
NULL_CAPTION = "caption_projection.y_embedding"
# PixArt-alpha's attention head width (1152 / 16 heads): the original format does not record the head count.
PIXART_HEAD_DIM = 72

# diffusers name -> our name, for tensors that map one to one ("{}" is a block index).
_DIFFUSERS_RENAMES = {
    "pos_embed.proj.{w}": "x_embedder.proj.{w}",
    "adaln_single.emb.timestep_embedder.linear_1.{w}": "t_embedder.mlp.0.{w}",
    "adaln_single.emb.timestep_embedder.linear_2.{w}": "t_embedder.mlp.2.{w}",
    "adaln_single.emb.resolution_embedder.linear_1.{w}": "csize_embedder.mlp.0.{w}",
    "adaln_single.emb.resolution_embedder.linear_2.{w}": "csize_embedder.mlp.2.{w}",
    "adaln_single.emb.aspect_ratio_embedder.linear_1.{w}": "ar_embedder.mlp.0.{w}",
    "adaln_single.emb.aspect_ratio_embedder.linear_2.{w}": "ar_embedder.mlp.2.{w}",
    "adaln_single.linear.{w}": "t_block.1.{w}",
    "caption_projection.linear_1.{w}": "y_embedder.y_proj.fc1.{w}",
    "caption_projection.linear_2.{w}": "y_embedder.y_proj.fc2.{w}",
    NULL_CAPTION: "y_embedder.y_embedding",
    "proj_out.{w}": "final_layer.linear.{w}",
    "scale_shift_table": "final_layer.scale_shift_table",
    "transformer_blocks.{i}.scale_shift_table": "blocks.{i}.scale_shift_table",
    "transformer_blocks.{i}.attn1.to_out.0.{w}": "blocks.{i}.mixer.proj.{w}",
    "transformer_blocks.{i}.attn2.to_q.{w}": "blocks.{i}.cross_attn.q_linear.{w}",
    "transformer_blocks.{i}.attn2.to_out.0.{w}": "blocks.{i}.cross_attn.proj.{w}",
    "transformer_blocks.{i}.ff.net.0.proj.{w}": "blocks.{i}.mlp.fc1.{w}",
    "transformer_blocks.{i}.ff.net.2.{w}": "blocks.{i}.mlp.fc2.{w}",
}
# Fused projections: our tensor = the concatenation (rows) of diffusers' tensors.
_DIFFUSERS_FUSED = {
    "blocks.{i}.mixer.qkv.{w}": ("transformer_blocks.{i}.attn1.to_q.{w}", "transformer_blocks.{i}.attn1.to_k.{w}",
                                 "transformer_blocks.{i}.attn1.to_v.{w}"),
    "blocks.{i}.cross_attn.kv_linear.{w}": ("transformer_blocks.{i}.attn2.to_k.{w}",
                                            "transformer_blocks.{i}.attn2.to_v.{w}"),
}
# 1024-MS's size embedders (``use_additional_conditions``): the only tensors a PixArt transformer may lack.
_OPTIONAL = ("adaln_single.emb.resolution", "adaln_single.emb.aspect")


def _expand(pattern: str, depth: int) -> list[dict]:
    """The substitutions of a name pattern: every block index for ``{i}``, weight and bias for ``{w}``."""
    blocks = range(depth) if "{i}" in pattern else [None]
    params = ("weight", "bias") if "{w}" in pattern else [None]
    return [{"i": i, "w": w} for i in blocks for w in params]


def conversion_problems(missing: list[str], unknown: list[str], whose: str, shapes: list[str] = ()) -> str:
    """What keeps a state dict from converting, in one clause per kind (empty when nothing does): the expected
    tensors ``missing``, the ``unknown`` ones (not ``whose``), and ``shapes`` ("name (shape) (expected ...)")."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected tensors are missing: {describe_names(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} tensors are not {whose}: {describe_names(unknown)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors have other shapes: {describe_names(list(shapes))}")
    return "; ".join(problems)


def convert_diffusers_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v) a ``PixArtTransformer2DModel`` state dict to our names; an error names the
    diffusers tensors that are missing or left over."""
    out, used, missing = {}, set(), []
    for theirs, ours in _DIFFUSERS_RENAMES.items():
        for sub in _expand(theirs, depth):
            name = theirs.format(**sub)
            if name in state:
                out[ours.format(**sub)] = state[name]
                used.add(name)
            elif not name.startswith(_OPTIONAL):
                missing.append(name)
    for ours, parts in _DIFFUSERS_FUSED.items():
        for sub in _expand(ours, depth):
            names = [part.format(**sub) for part in parts]
            absent = [n for n in names if n not in state]
            if absent:
                missing += absent
                continue
            out[ours.format(**sub)] = torch.cat([state[n] for n in names])
            used.update(names)
    if NULL_CAPTION in missing:
        raise ConfigError(
            f"the diffusers PixArt weights lack {NULL_CAPTION!r}, PixArt's learned null caption that "
            "classifier-free guidance and caption dropout use: diffusers' save_pretrained drops it. Convert the "
            "released weights (the hub's transformer/ folder or the original .pth), which hold it")
    unknown = sorted(k for k in state if k not in used)
    problems = conversion_problems(missing, unknown, "PixArt-alpha's")
    if problems:
        raise ConfigError(f"these diffusers PixArt-alpha weights do not convert: {problems}")
    return out


def to_diffusers_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our all-attention backbone's tensors -> ``PixArtTransformer2DModel`` names: ``convert_diffusers_state``
    run backwards over the same tables, each fused projection split back into its equal row blocks (q, k, v).
    The result holds the null caption (``NULL_CAPTION``) besides diffusers' model tensors."""
    out = {}
    for theirs, ours in _DIFFUSERS_RENAMES.items():
        for sub in _expand(theirs, depth):
            if ours.format(**sub) in state or not theirs.startswith(_OPTIONAL):
                out[theirs.format(**sub)] = state[ours.format(**sub)]
    for ours, parts in _DIFFUSERS_FUSED.items():
        for sub in _expand(ours, depth):
            rows = state[ours.format(**sub)].chunk(len(parts))
            out.update({part.format(**sub): row.clone() for part, row in zip(parts, rows)})
    return out


def diffusers_config(config: dict, sample_size: int | None = None) -> dict:
    """``PixArtTransformer2DModel`` arguments for a ``Backbone`` config (the inverse of ``convert_pixart``'s
    reading of a diffusers config), or a ConfigError naming everything diffusers' PixArt transformer cannot hold.

    diffusers stretches each axis's positions to ``sample_size / patch_size`` (our ``base_size``). A backbone
    with ``base_size: null`` (one position step per token, every teacher trained here) has no such size: the
    caller names the latent side it was trained at as ``sample_size``, where the two embeddings are equal (for
    square inputs; at other square sizes diffusers interpolates the positions as ``callbacks.PEInterpolation``).
    """
    patch, base_size = config["patch_size"], config["base_size"]
    with torch.device("meta"):  # the config as the backbone reads it (older forms included), nothing allocated
        backbone = Backbone.from_config(config)
    config, kinds = backbone.config, backbone.block_kinds
    mamba = [kind for kind in kinds if kind != "attn"]
    problems = [f"{len(mamba)} of its {len(kinds)} blocks are Mamba ({', '.join(sorted(set(mamba)))}; a PixArt "
                "transformer has self-attention blocks only: layout 'dit')"] if mamba else []
    if config["mlp_ratio"] != 4:
        problems.append(f"mlp_ratio {config['mlp_ratio']} (diffusers' PixArt MLP is 4x wide)")
    if config["pe_mode"] != "pixart":
        problems.append(f"pe_mode {config['pe_mode']!r} (diffusers has PixArt's positional embedding only)")
    if base_size is None and sample_size is None:
        problems.append("base_size null (one position per token): pass --sample_size, the latent side it was "
                        "trained at (64 for 512^2 on SD-VAE latents), where diffusers' positions equal ours")
    elif base_size is not None and sample_size not in (None, base_size * patch):
        problems.append(f"sample_size {sample_size}: the backbone's base_size {base_size} fixes it at "
                        f"{base_size * patch}")
    elif sample_size is not None and sample_size % patch:
        problems.append(f"sample_size {sample_size} is not a multiple of the patch size {patch}")
    if problems:
        raise ConfigError(f"this backbone is not exportable as a diffusers PixArtTransformer2DModel: "
                          f"{'; '.join(problems)}")
    hidden, heads, channels = config["hidden_size"], config["num_heads"], config["in_channels"]
    return dict(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=channels,
        out_channels=2 * channels if config["learn_sigma"] else channels, num_layers=config["depth"],
        cross_attention_dim=hidden, sample_size=sample_size or base_size * patch, patch_size=patch,
        interpolation_scale=config["pe_interpolation"], use_additional_conditions=config["micro_conditioning"],
        caption_channels=config["caption_channels"],
    )


def write_diffusers(state: dict[str, torch.Tensor], config: dict, out_dir: str) -> str:
    """Write our backbone tensors as a ``PixArtTransformer2DModel`` folder: ``config.json`` (diffusers'
    ``save_config``) and ``diffusion_pytorch_model.safetensors`` holding the model's tensors and the null caption,
    which ``save_pretrained`` would drop (diffusers warns that it does not use it, as for the hub's folders).

    Args:
        state: the backbone's tensors (our names).
        config: ``PixArtTransformer2DModel`` arguments from ``diffusers_config``.
        out_dir: the folder to write (``PixArtTransformer2DModel.from_pretrained(out_dir)`` loads it).
    Returns the folder.
    """
    tensors = to_diffusers_state(state, config["num_layers"])
    with torch.device("meta"):  # the config file, and a check that every tensor has its place, without allocating
        model = PixArtTransformer2DModel(**config)
    model.load_state_dict({k: v for k, v in tensors.items() if k != NULL_CAPTION}, assign=True)
    os.makedirs(out_dir, exist_ok=True)
    model.save_config(out_dir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, DIFFUSERS_WEIGHTS[0]),
              metadata={"format": "pt"})
    return out_dir


def convert_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PixArt-alpha's own names -> ours: ``blocks.<i>.attn.*`` -> ``blocks.<i>.mixer.*``; ``pos_embed`` dropped
    (recomputed)."""
    return {re.sub(r"^blocks\.(\d+)\.attn\.", r"blocks.\1.mixer.", k): v for k, v in state.items()
            if k != "pos_embed"}


def backbone_config(state: dict[str, torch.Tensor], num_heads: int, base_size: int, pe_interpolation: float) -> dict:
    """Our ``Backbone`` arguments for converted PixArt tensors (sizes read from the tensor shapes)."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    proj = state["x_embedder.proj.weight"]  # (hidden, in_channels, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out_channels = state["final_layer.linear.weight"].shape[0] // patch**2
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(f"the final layer gives {out_channels} channels for {in_channels} input channels; "
                          "PixArt-alpha gives the same number (fixed sigma) or twice as many (learned sigma)")
    if hidden % num_heads:
        raise ConfigError(f"num_heads={num_heads} does not divide the width {hidden}")
    y_embedding = state["y_embedder.y_embedding"]
    return dict(
        layout="dit", depth=depth, hidden_size=hidden, num_heads=num_heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, patch_size=patch, in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels, caption_channels=y_embedding.shape[1],
        token_num=y_embedding.shape[0], base_size=base_size, pe_interpolation=pe_interpolation,
        micro_conditioning="csize_embedder.mlp.0.weight" in state,
    )


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(f"{path!r} holds more than tensors, and is read with weights_only=True to run no code "
                          f"from it ({str(error).splitlines()[0]}); re-save its state_dict alone") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path!r} does not hold a dict of tensors")
    return loaded


def read_diffusers_folder(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and ``config.json`` of a ``PixArtTransformer2DModel`` folder (or a pipeline's ``transformer/``)."""
    if os.path.isfile(os.path.join(folder, "transformer", "config.json")):
        folder = os.path.join(folder, "transformer")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{folder!r} has no config.json; pass a diffusers PixArtTransformer2DModel folder, a "
                          "pipeline folder with transformer/, or an original PixArt-alpha .pth")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("_class_name", "PixArtTransformer2DModel") != "PixArtTransformer2DModel":
        raise ConfigError(f"{config_path!r} describes a {config['_class_name']}, not a PixArtTransformer2DModel")
    for name in DIFFUSERS_WEIGHTS:
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):  # sharded
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_load_tensors(os.path.join(folder, shard)))
            return state, config
        if os.path.isfile(os.path.join(folder, name)):
            return _load_tensors(os.path.join(folder, name)), config
    raise ConfigError(f"{folder!r} has no {' or '.join(DIFFUSERS_WEIGHTS)} (or their sharded index)")


def read_original(path: str, ema: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a file in the original repositories' format (PixArt-alpha's, Dimba's): a ``torch.load``
    file holding ``{"state_dict": ...}`` (``state_dict_ema`` too when saved in training: taken when ``ema``) or
    the tensors themselves, or a ``.safetensors`` file of them."""
    loaded = _load_tensors(path)
    if "state_dict" in loaded or "state_dict_ema" in loaded:
        loaded = loaded["state_dict_ema"] if ema and "state_dict_ema" in loaded else loaded["state_dict"]
    return loaded


def convert_original(loaded: dict[str, torch.Tensor], path: str, num_heads: int | None = None,
                     base_size: int | None = None, pe_interpolation: float | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """PixArt-alpha's tensors in its own names (read from ``path``) -> (our backbone tensors, ``Backbone``
    arguments); ``num_heads``, ``base_size``, ``pe_interpolation`` as for ``convert_pixart``."""
    if "transformer_blocks.0.attn1.to_q.weight" in loaded:
        raise ConfigError(f"{path!r} holds diffusers tensors; pass the folder with its config.json instead")
    if "blocks.0.attn.qkv.weight" not in loaded:
        raise ConfigError(f"{path!r} is not a PixArt-alpha checkpoint: it has no 'blocks.0.attn.qkv.weight' "
                          f"(its first tensors: {describe_names(sorted(loaded))})")
    converted = convert_original_state(loaded)
    hidden = converted["x_embedder.proj.weight"].shape[0]
    scale = 2.0 if "csize_embedder.mlp.0.weight" in converted else 1.0  # 1024-MS, else 512
    return converted, backbone_config(converted, num_heads or max(hidden // PIXART_HEAD_DIM, 1),
                                      base_size or int(32 * scale), pe_interpolation or scale)


def convert_pixart(path: str, ema: bool = True, num_heads: int | None = None, base_size: int | None = None,
                   pe_interpolation: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read PixArt-alpha weights in either format and return (our backbone tensors, ``Backbone`` arguments).

    Args:
        path: an original ``.pth`` / ``.safetensors`` file, or a diffusers model or pipeline folder.
        ema: for an original training checkpoint that also holds ``state_dict_ema``, take that.
        num_heads, base_size, pe_interpolation: for the original format, which does not record them: the heads
            (default width / 72) and the positional embedding's grid and scale at the training resolution
            (default PixArt's: 32 and 1 for 512^2 weights, 64 and 2 for 1024-MS weights). diffusers folders
            record all three in their config.
    """
    if not os.path.exists(path):
        raise ConfigError(f"PixArt-alpha weights {path!r} do not exist; pass the original .pth file or a diffusers "
                          "PixArtTransformer2DModel folder")
    if os.path.isdir(path):
        state, config = read_diffusers_folder(path)
        depth = config.get("num_layers", 28)
        converted = convert_diffusers_state(state, depth)
        sample_size, patch = config.get("sample_size", 128), config.get("patch_size", 2)
        additional = config.get("use_additional_conditions")
        if additional is None:  # diffusers' own default
            additional = sample_size == 128
        if additional != ("csize_embedder.mlp.0.weight" in converted):
            raise ConfigError(f"{path!r}: config.json says use_additional_conditions={additional} but the weights "
                              f"{'lack' if additional else 'have'} the size embedders")
        scale = config.get("interpolation_scale") or max(sample_size // 64, 1)
        heads = config.get("num_attention_heads", 16)
        return converted, backbone_config(converted, heads, sample_size // patch, float(scale))

    return convert_original(read_original(path, ema), path, num_heads, base_size, pe_interpolation)
