"""Import released weights of other projects as our ``Backbone``: PixArt-alpha (``lit_dimba.convert.pixart``:
original files and diffusers folders) and Dimba (``lit_dimba.convert.dimba``: original files), told apart by
their tensor names. ``python -m lit_dimba.convert SOURCE OUT`` writes either as an export folder."""

import os

import torch

from lit_dimba.convert.dimba import convert_dimba_state, is_dimba
from lit_dimba.convert.pixart import convert_original, convert_pixart, read_original
from lit_dimba.errors import ConfigError


def is_released(path: str) -> bool:
    """True if ``path`` looks like released weights (a ``.pth``/``.pt``/``.bin`` file or a diffusers folder of a
    PixArt transformer) rather than one of our checkpoints or exports."""
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, sub, "config.json")) for sub in ("", "transformer")) \
            and not os.path.isfile(os.path.join(path, "backbone.yaml"))
    return path.endswith((".pth", ".pt", ".bin"))


def convert_released(path: str, ema: bool = True, num_heads: int | None = None, base_size: int | None = None,
                     pe_interpolation: float | None = None) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Released weights -> (our backbone tensors, ``Backbone`` arguments, their format: "dimba" or
    "pixart-alpha").

    Args:
        path: a diffusers PixArt folder, or an original-format file (``.pth``, ``.pt``, ``.safetensors``), read
            once: PixArt-alpha's or Dimba's (which has ``mamba_blocks.*``).
        ema: for a training checkpoint that also holds ``state_dict_ema``, take that.
        num_heads, base_size, pe_interpolation: what the original files do not record (see ``convert_pixart``
            and ``lit_dimba.convert.dimba``); None: the release's defaults.
    """
    if not os.path.exists(path):
        raise ConfigError(f"released weights {path!r} do not exist; pass PixArt-alpha's or Dimba's original file "
                          "(.pth / .pt) or a diffusers PixArtTransformer2DModel folder")
    if os.path.isdir(path):
        return (*convert_pixart(path, ema, num_heads, base_size, pe_interpolation), "pixart-alpha")
    state = read_original(path, ema)
    if is_dimba(state):
        return (*convert_dimba_state(state, path, num_heads, base_size, pe_interpolation), "dimba")
    return (*convert_original(state, path, num_heads, base_size, pe_interpolation), "pixart-alpha")
