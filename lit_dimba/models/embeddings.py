"""Input embeddings of the backbone: patches, 2-D sin-cos positions, timesteps and captions.

Module and parameter names follow PixArt-alpha (``x_embedder``, ``t_embedder``, ``y_embedder``), so a
PixArt checkpoint maps onto them by name.
"""

import math

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos embedding of float positions.

    positions: (N,) -> (N, dim), first half sin, second half cos, frequencies 1 / 10000^(2i/dim).
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, height: int, width: int, base_size: int | None, pe_interpolation: float,
              device: torch.device | None = None, mode: str = "pixart") -> torch.Tensor:
    """2-D sin-cos positional embedding for a (height x width) token grid.

    ``mode="pixart"``: coordinates ``arange(n) / (n / base) / pe_interpolation`` per axis (PixArt-alpha's formula).
    With ``base_size`` None the base is each axis's own length n: positions step by ``1 / pe_interpolation`` per
    token on both axes, so at a fixed ``pe_interpolation`` a larger grid reaches positions a smaller one never had
    (extrapolation), and raising ``pe_interpolation`` with the grid squeezes it into the range it had
    (interpolation; ``callbacks.PEInterpolation``). With an int ``base_size`` (PixArt-alpha's checkpoints, whose
    converter sets it) every axis is stretched to ``base_size / pe_interpolation`` positions whatever its length.

    ``mode="centred"``: coordinates are centred on the middle of the grid and share one step on both axes,
    ``(i - (n - 1) / 2) * base / pe_interpolation / max(height, width)`` with ``base = base_size`` or, when it is
    None, the long edge (one step of ``1 / pe_interpolation`` per token): the long edge spans what PixArt's square
    grid spans and the short edge proportionally less, so other resolutions and aspect ratios keep the geometry of
    training (for zero-shot higher resolutions, T2MD's last stage).

    The first ``dim/2`` channels encode the column (width) coordinate, the last ``dim/2`` the row (height)
    coordinate. Returns (height * width, dim) float32, tokens in row-major order (row i, column j -> i * width + j).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    if mode not in ("pixart", "centred"):
        raise ValueError(f"unknown PE mode {mode!r}; choose 'pixart' or 'centred'")
    rows = torch.arange(height, dtype=torch.float64, device=device)
    cols = torch.arange(width, dtype=torch.float64, device=device)
    if mode == "pixart":
        rows = rows / (height / (base_size or height)) / pe_interpolation
        cols = cols / (width / (base_size or width)) / pe_interpolation
    else:
        step = (base_size or max(height, width)) / pe_interpolation / max(height, width)
        rows = (rows - (height - 1) / 2) * step
        cols = (cols - (width - 1) / 2) * step
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    emb_cols = sincos_1d(dim // 2, grid_cols.reshape(-1))
    emb_rows = sincos_1d(dim // 2, grid_rows.reshape(-1))
    return torch.cat([emb_cols, emb_rows], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens.

    (B, C, H, W) -> (B, H/p * W/p, hidden), row-major token order.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps to vectors: sinusoidal features (cos first, as DiT) then a 2-layer MLP.

    (B,) -> (B, hidden).
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def timestep_features(self, t: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, frequency_size) float32."""
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.timestep_features(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class Mlp(nn.Module):
    """Two linear layers with tanh-approximated GELU (timm naming: fc1, fc2). (..., in) -> (..., out).

    Without gradients on CUDA (sampling, validation), fc1, its bias and the GELU are one cuBLASLt GEMM with a GELU
    epilogue (``torch._addmm_activation``, which inductor keeps as it is), in the autocast dtype when autocast is on:
    the GELU then costs no separate pass over the (..., hidden) activations. That op has no autograd formula, so
    training keeps the two steps.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not torch.is_grad_enabled():
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            fc1 = self.fc1
            hidden = torch._addmm_activation(fc1.bias.to(dtype), x.flatten(0, -2).to(dtype), fc1.weight.to(dtype).t(),
                                             use_gelu=True)
            return self.fc2(hidden.unflatten(0, x.shape[:-1]))
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects text-encoder features to the model width and holds the learned null caption for CFG.

    ``y_embedding`` (token_num, caption_channels) is the "empty caption" that replaces dropped captions in
    training (caption dropout) and feeds the unconditional branch of classifier-free guidance. Its mask is
    all ones.
    """

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.token_num = token_num
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None = None):
        """y: (B, L, caption_channels), mask: (B, L) bool, drop: (B,) bool or None.

        Returns projected features (B, L, hidden) and the mask (B, L) with dropped rows set to the null
        caption and an all-true mask.
        """
        if y.shape[1] != self.token_num:
            raise ValueError(
                f"caption features have {y.shape[1]} tokens but the backbone was built for token_num="
                f"{self.token_num}; set the text encoder's max_length and the backbone's token_num equal"
            )
        if drop is not None:
            y = torch.where(drop[:, None, None], self.y_embedding.to(y.dtype)[None], y)
            mask = mask | drop[:, None]
        return self.y_proj(y), mask
