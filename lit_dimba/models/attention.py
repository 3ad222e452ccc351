"""Multi-head self- and cross-attention on ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPU). Names follow PixArt-alpha: ``qkv``/``proj`` for self-attention, ``q_linear``/``kv_linear``/
``proj`` for cross-attention.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Token mixer over image tokens. (B, N, C) -> (B, N, C); the grid shape is not needed."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens.

    x: (B, N, C) queries, y: (B, L, C) keys/values, mask: (B, L) bool, True = attend. -> (B, N, C).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        L = y.shape[1]
        head_dim = C // self.num_heads
        q = self.q_linear(x).view(B, N, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, L, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
