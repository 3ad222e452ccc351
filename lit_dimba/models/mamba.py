"""Mamba-2 token mixer (SSD, Dao & Gu, arXiv 2405.21060) and its 2-D scan over image tokens.

``Mamba2`` names and shapes its parameters like ``mamba_ssm.modules.mamba2.Mamba2`` (mamba-ssm 2.2/2.3) with
its default options (ngroups=1, rmsnorm=True, norm_before_gate=False, bias=False, conv_bias=True), so state
dicts load in either direction. Its selective scan runs either mamba-ssm's fused Triton kernel (CUDA only,
optional install) or ``ssd_chunked``, the paper's block decomposition in plain PyTorch (any device); the
``kernel`` argument picks one at run time.

Shapes: b batch, l sequence length, h heads, p head dim, g groups (B and C are shared by the h / g heads of a
group; head k reads group k // (h / g)), n state size, T chunk size, c number of chunks.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lit_dimba.errors import ConfigError

KERNELS = ("auto", "torch", "mamba_ssm")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or in its own dtype when that is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums of per-step log-decays as a causal matrix.

    x: (..., T) -> (..., T, T) with out[..., i, j] = x[..., j+1] + ... + x[..., i] for j <= i (0 on the
    diagonal) and -inf above it, so ``exp(segsum(x))`` is the decay from step j to step i with exact zeros
    above the diagonal. Each entry sums only its own segment (a masked cumsum down the columns) rather than
    differencing two long prefix sums, so small decays stay exact next to large ones.
    """
    T = x.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=x.device)
    x = x[..., :, None].expand(*x.shape, T).masked_fill(~ones.tril(-1), 0)  # [..., i, j] = x_i for i > j
    return x.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def ssd_naive(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Reference SSD scan: the recurrence, one time step at a time (for tests).

    x: (b, l, h, p), dt: (b, l, h) positive steps, A: (h,) negative rates, B, C: (b, l, g, n).
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T (per head, h_t: (p, n)), y_t = h_t C_t.
    Returns y: (b, l, h, p) in x.dtype (computed in at least float32), without the D skip term.
    """
    dtype = x.dtype
    x, dt, A, B, C = (t.to(torch.promote_types(dtype, torch.float32)) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    B, C = B.repeat_interleave(heads_per_group, dim=2), C.repeat_interleave(heads_per_group, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        update = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]  # (b, h, p, n)
        state = torch.exp(dt[:, t] * A)[..., None, None] * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1).to(dtype)


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
    """SSD scan by the paper's block decomposition of the (l x l) semiseparable matrix into T x T blocks.

    x: (b, l, h, p), dt: (b, l, h) positive steps (after softplus), A: (h,) negative rates, B, C: (b, l, g, n),
    chunk_size: T (any l works: the sequence is zero-padded to a multiple of T at the end, where dt = 0 adds
    nothing and, being after every real step, changes none of them).
    Returns y: (b, l, h, p) in x.dtype, computed in at least float32, without the D skip term; equal to
    ``ssd_naive`` up to rounding.

    The four steps: (1) diagonal blocks, the quadratic "attention" form inside each chunk; (2) the state each
    chunk leaves from its own inputs; (3) the recurrence passing states from chunk to chunk; (4) the
    contribution of the state entering each chunk to its outputs.
    """
    in_dtype, dtype = x.dtype, torch.promote_types(x.dtype, torch.float32)
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r, T = h // g, chunk_size
    pad = -l % T
    x, dt, B, C = (F.pad(t.to(dtype), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (l + pad) // T
    x = x.reshape(b, c, T, g, r, p)
    B, C = B.reshape(b, c, T, g, n), C.reshape(b, c, T, g, n)
    dA = (dt * A.to(dtype)).reshape(b, c, T, h).transpose(2, 3)  # (b, c, h, T) per-step log-decay
    xdt = x * dt.reshape(b, c, T, g, r, 1)  # (b, c, T, g, r, p)

    # (1) y_i = sum_{j <= i} (C_i . B_j) exp(dA_{j+1} + ... + dA_i) dt_j x_j within the chunk.
    decay = torch.exp(segsum(dA)).reshape(b, c, g, r, T, T)  # [..., i, j]
    scores = torch.einsum("bcign,bcjgn->bcgij", C, B)[:, :, :, None] * decay
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, xdt)

    # (2) State at the chunk's end from its own inputs: sum_j exp(dA_{j+1} + ... + dA_{T-1}) dt_j x_j B_j^T,
    # the decays being the last row of the within-chunk decay matrix.
    states = torch.einsum("bcgrj,bcjgrp,bcjgn->bcgrpn", decay[..., -1, :], xdt, B)

    # (3) State after chunk k: sum_{m <= k} exp(total log-decay of chunks m+1..k) states_m; chunk k starts
    # from the state after chunk k - 1 (zero for the first).
    carry = torch.exp(segsum(dA.sum(-1).transpose(1, 2))).reshape(b, g, r, c, c)  # [..., k, m]
    ends = torch.einsum("bgrkm,bmgrpn->bkgrpn", carry, states)
    starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)

    # (4) y_i += exp(dA_0 + ... + dA_i) C_i . start state.
    lead_in = torch.exp(dA.cumsum(-1)).reshape(b, c, g, r, T)
    y = y + torch.einsum("bcign,bcgrpn,bcgri->bcigrp", C, starts, lead_in)
    return y.reshape(b, c * T, h, p)[:, :l].to(in_dtype)


def _import_kernels():
    """(mamba-ssm's fused SSD scan, causal-conv1d's conv), each None when its package does not import."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        mamba_chunk_scan_combined = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        causal_conv1d_fn = None
    return mamba_chunk_scan_combined, causal_conv1d_fn


class RMSNormGated(nn.Module):
    """mamba-ssm's gated RMSNorm with norm_before_gate=False: rmsnorm(x * silu(z)) * weight.

    The RMS is taken over groups of ``group_size`` channels. x, z: (..., dim) -> (..., dim) in x.dtype,
    computed in at least float32.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (_at_least_fp32(x) * F.silu(_at_least_fp32(z))).unflatten(-1, (-1, self.group_size))
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)
        return (y.flatten(-2) * self.weight).to(x.dtype)


class Mamba2(nn.Module):
    """Mamba-2 mixer, parameter-compatible with ``mamba_ssm.modules.mamba2.Mamba2``. (b, l, d_model) -> same.

    in_proj gives z (gate, d_inner), xBC (conv_dim = d_inner + 2 * ngroups * d_state) and dt (nheads);
    xBC goes through a causal depthwise conv and SiLU and splits into x (nheads x headdim), B and C
    (ngroups x d_state); the SSD scan with dt = softplus(dt + dt_bias), A = -exp(A_log) and skip D gives y,
    and out_proj(rmsnorm(y * silu(z)) * norm.weight) is the output.

    Args:
        d_model: token width; d_inner = expand * d_model, nheads = d_inner / headdim.
        d_state, d_conv, expand, headdim, ngroups: as in mamba-ssm.
        A_init_range, dt_min, dt_max, dt_init_floor: initialisation of A_log and dt_bias (``init_ssm_parameters``).
        chunk_size: T of the chunked scan (both kernels).
        kernel: "auto": mamba-ssm's Triton scan (and causal-conv1d's conv, when installed) for CUDA inputs where
            mamba-ssm imports, else plain PyTorch; "torch": plain PyTorch always; "mamba_ssm": mamba-ssm's scan
            always (a ConfigError for non-CUDA inputs or without mamba-ssm), with causal-conv1d's conv when
            installed, else nn.Conv1d.

    Initialisation: ``in_proj``, ``conv1d`` and ``out_proj`` start with PyTorch's defaults and ``norm.weight`` with
    ones; ``dt_bias``, ``A_log`` and ``D`` get mamba-ssm's initialisation from ``init_ssm_parameters``; a model
    that re-initialises all its parameters (e.g. with xavier) calls ``reset_parameters`` afterwards. These three carry
    ``_no_weight_decay = True`` as in mamba-ssm.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 256,
        kernel: str = "auto",
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError(f"unknown Mamba2 kernel {kernel!r}; choose one of {KERNELS}: 'auto' (mamba-ssm "
                              "on CUDA when installed, else PyTorch), 'torch' or 'mamba_ssm' (CUDA only)")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"d_inner = expand * d_model = {d_inner} is not divisible by headdim {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"nheads = {nheads} is not divisible by ngroups {ngroups}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.d_inner, self.nheads, self.headdim = d_inner, nheads, headdim
        self.ngroups, self.d_state, self.chunk_size, self.kernel = ngroups, d_state, chunk_size, kernel
        self.A_init_range, self.dt_min, self.dt_max, self.dt_init_floor = A_init_range, dt_min, dt_max, dt_init_floor
        self.conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(nheads))
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True
        self.norm = RMSNormGated(d_inner, group_size=d_inner // ngroups, eps=1e-5)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.init_ssm_parameters()

        self._chunk_scan, conv = (None, None) if kernel == "torch" else _import_kernels()
        self._causal_conv = conv if 2 <= d_conv <= 4 else None  # causal-conv1d supports widths 2..4

    def reset_parameters(self):
        """mamba-ssm's initialisation of everything a surrounding model's init may overwrite: PyTorch-default
        ``in_proj``/``out_proj`` and ``init_ssm_parameters``. A backbone calls it after its own (xavier) init."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        self.init_ssm_parameters()

    @torch.no_grad()
    def init_ssm_parameters(self):
        """mamba-ssm's init: dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (at least dt_init_floor);
        A_log = log(A), A uniform in A_init_range; D = 1."""
        log_min, log_max = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.nheads) * (log_max - log_min) + log_min).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.empty(self.nheads).uniform_(*self.A_init_range).log())
        self.D.fill_(1.0)

    def _fused_scan(self, x: torch.Tensor) -> bool:
        """Whether this call uses mamba-ssm's scan (see ``kernel``); a ConfigError if forced but impossible."""
        available = x.is_cuda and self._chunk_scan is not None
        if self.kernel == "mamba_ssm" and not available:
            raise ConfigError(
                f"Mamba2 kernel='mamba_ssm' runs mamba-ssm's Triton kernel, which needs a CUDA input and mamba-ssm "
                f"installed (pip install -e '.[gpu]'); got a {x.device.type} input and mamba_ssm "
                f"{'importable' if self._chunk_scan is not None else 'not importable'}. Use kernel='auto' "
                "(mamba-ssm where it can run, else PyTorch) or kernel='torch'"
            )
        return available

    def _conv(self, xBC: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv then SiLU. xBC: (b, l, conv_dim) -> (b, l, conv_dim)."""
        if xBC.is_cuda and self._causal_conv is not None:
            weight = self.conv1d.weight.squeeze(1)  # (conv_dim, d_conv)
            return self._causal_conv(xBC.transpose(1, 2).contiguous(), weight, self.conv1d.bias,
                                     activation="silu").transpose(1, 2)
        return F.silu(self.conv1d(xBC.transpose(1, 2))[..., : xBC.shape[1]]).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, l, d_model) -> (b, l, d_model), causal in l."""
        fused = self._fused_scan(x)
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xs, B, C = self._conv(xBC).split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        xs = xs.unflatten(-1, (self.nheads, self.headdim))  # (b, l, h, p)
        B = B.unflatten(-1, (self.ngroups, self.d_state))  # (b, l, g, n)
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        A = -torch.exp(_at_least_fp32(self.A_log))  # (h,)
        if fused:
            y = self._chunk_scan(xs, dt, A, B, C, self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias,
                                 dt_softplus=True, seq_idx=None)
        else:
            dt = F.softplus(_at_least_fp32(dt) + self.dt_bias)  # (b, l, h)
            y = ssd_chunked(xs, dt, A, B, C, self.chunk_size) + xs * self.D[:, None]
        return self.out_proj(self.norm(y.flatten(-2), z))


class Scan2D(nn.Module):
    """Mamba-2 token mixer over an (h x w) grid of tokens in row-major order (row i, column j -> i * w + j).

    order "w" (width-first) scans the tokens in their row-major order: along each row, row after row.
    order "h" (height-first) scans them column-major: down each column, column after column (the grid
    transposed); the output is put back into row-major order.
    bidirectional: the scan sequence and its reversal are stacked along the batch and run through the same
    ``mamba`` in one call; the reversed output is flipped back and ``fuse`` (Linear(2C, C)) mixes the
    concatenation [forward, backward], so each token sees the whole grid. Otherwise one causal scan, no ``fuse``.

    forward: x (B, N, C), grid (h, w) with h * w = N -> (B, N, C).
    """

    def __init__(self, d_model: int, order: str, bidirectional: bool = True, **mamba_kwargs):
        super().__init__()
        if order not in ("h", "w"):
            raise ValueError(f"unknown scan order {order!r}; choose 'h' (height-first) or 'w' (width-first)")
        self.order = order
        self.bidirectional = bidirectional
        self.mamba = Mamba2(d_model, **mamba_kwargs)
        if bidirectional:
            self.fuse = nn.Linear(2 * d_model, d_model)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        h, w = grid
        if h * w != N:
            raise ValueError(f"grid {h}x{w} has {h * w} tokens but the input has {N}")
        if self.order == "h":
            x = x.view(B, h, w, C).transpose(1, 2).reshape(B, N, C)
        if self.bidirectional:
            forward, backward = self.mamba(torch.cat([x, x.flip(1)])).chunk(2)
            y = self.fuse(torch.cat([forward, backward.flip(1)], dim=-1))
        else:
            y = self.mamba(x)
        if self.order == "h":
            y = y.view(B, w, h, C).transpose(1, 2).reshape(B, N, C)
        return y
