"""Mamba-2 token mixer (SSD, Dao & Gu, arXiv 2405.21060) and its 2-D bidirectional scan over image tokens.

``Mamba2`` names and shapes its parameters like ``mamba_ssm.modules.mamba2.Mamba2`` (mamba-ssm 2.2/2.3) with
its default options (ngroups=1, rmsnorm=True, norm_before_gate=False, bias=False, conv_bias=True), so state
dicts load in either direction. Its conv, scan and gated norm are the functions of ``lit_dimba.models.mamba_ops``:
on CUDA mamba-ssm's fused Triton scan, our Triton gated norm and conv along scan orders (``scan2d_kernels``) and
causal-conv1d's conv (optional installs), plain PyTorch anywhere; the ``kernel`` argument picks at run time.

``Scan2D`` runs one ``Mamba2`` over a token grid in several scan orders (row- or column-first, forwards and
backwards) with work shared between them: the per-token layers (``in_proj``, the gated norm, ``out_proj`` and the
fusion) see every token once, in row-major order; only the conv and the scan, which depend on the order, run on
the sequences, into which the conv reads the rows (in place on CUDA, through a gather elsewhere); the gated norm
reads their outputs back in row-major order.

Shapes: b batch, l sequence length, h heads, p head dim, g groups, n state size; B, N, C batch, tokens and width
of the image-token sequence, S the number of scan sequences (2 when bidirectional).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lit_dimba.errors import ConfigError
from lit_dimba.models.mamba_ops import (at_least_fp32, causal_conv1d_kernel, causal_conv1d_silu_columns,
                                        gated_rms_norm, gathered_causal_conv1d_silu, mamba_ssm_ssd_kernels,
                                        scan2d_kernels, scan_parts, ssd_reference, ssd_scan)

KERNELS = ("auto", "torch", "mamba_ssm")
GEMM_MULTIPLE = 64  # in_proj's output width is padded to this, so its rows stay aligned for Hopper's GEMM kernels


def initial_dt_bias(n: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """mamba-ssm's dt bias init (Mamba-1 and Mamba-2): (n,) softplus^-1(dt), dt log-uniform in [dt_min, dt_max] and at
    least dt_init_floor, so that softplus(bias) starts at dt."""
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(n) * (log_max - log_min) + log_min).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class RMSNormGated(nn.Module):
    """mamba-ssm's gated RMSNorm with norm_before_gate=False: rmsnorm(x * silu(z)) * weight, the RMS taken over
    groups of ``group_size`` channels; computed by ``mamba_ops.gated_rms_norm``, which also takes several x that
    share one z (the directions of a bidirectional scan) and reads them through a row index.

    forward: x (b, m, dim) rows in any order, rows (n, S) int64 (token t's s-th x is x[:, rows[t, s]]), z (b * n, dim)
    -> (b * n, S, dim) in x.dtype, computed in at least float32; ``fused``: the Triton kernel (CUDA) rather than the
    PyTorch form.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return gated_rms_norm(x, rows, z, self.weight, self.group_size, self.eps, fused)


class Mamba2(nn.Module):
    """Mamba-2 mixer, parameter-compatible with ``mamba_ssm.modules.mamba2.Mamba2``. (b, l, d_model) -> same.

    in_proj gives z (gate, d_inner), xBC (conv_dim = d_inner + 2 * ngroups * d_state) and dt (nheads);
    xBC goes through a causal depthwise conv and SiLU and splits into x (nheads x headdim), B and C
    (ngroups x d_state); the SSD scan with dt = softplus(dt + dt_bias), A = -exp(A_log) and skip D gives y,
    and out_proj(rmsnorm(y * silu(z)) * norm.weight) is the output. ``forward`` is ``in_projection``, ``convolve``,
    ``scan`` and that output; ``Scan2D`` calls the first three itself to share the per-token work between scan orders.

    Args:
        d_model: token width; d_inner = expand * d_model, nheads = d_inner / headdim.
        d_state, d_conv, expand, headdim, ngroups: as in mamba-ssm.
        A_init_range, dt_min, dt_max, dt_init_floor: initialisation of A_log and dt_bias (``init_ssm_parameters``).
        chunk_size: T of the chunked scan (both kernels).
        kernel: "auto": the CUDA kernels (mamba-ssm's Triton scan, our Triton gated norm and conv along scan
            orders) for CUDA inputs where mamba-ssm imports, else plain PyTorch; "torch": plain PyTorch always;
            "mamba_ssm": the CUDA kernels always (a ConfigError for non-CUDA inputs or without mamba-ssm). Except
            with "torch", the conv along l as given runs causal-conv1d's CUDA kernel where it is installed
            (``mamba_ops.causal_conv1d_silu``).

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

        # Resolved once here, not while torch.compile traces.
        self._has_mamba_ssm = (kernel != "torch" and mamba_ssm_ssd_kernels() is not None
                               and scan2d_kernels() is not None)
        self._conv_kernel = None if kernel == "torch" else causal_conv1d_kernel()

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
        self.dt_bias.copy_(initial_dt_bias(self.nheads, self.dt_min, self.dt_max, self.dt_init_floor))
        self.A_log.copy_(torch.empty(self.nheads).uniform_(*self.A_init_range).log())
        self.D.fill_(1.0)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether this call uses the CUDA kernels (mamba-ssm's scan, our Triton norm and conv along scan orders; see
        ``kernel``); a ConfigError if forced but impossible."""
        available = x.is_cuda and self._has_mamba_ssm
        if self.kernel == "mamba_ssm" and not available:
            raise ConfigError(
                f"Mamba2 kernel='mamba_ssm' runs mamba-ssm's Triton kernel, which needs a CUDA input and mamba-ssm "
                f"installed (pip install -e '.[gpu]'); got a {x.device.type} input and mamba_ssm "
                f"{'importable' if self._has_mamba_ssm else 'not importable'}. Use kernel='auto' "
                "(mamba-ssm where it can run, else PyTorch) or kernel='torch'"
            )
        return available

    def padded_in_weight(self) -> torch.Tensor:
        """in_proj's weight with zero rows appended up to a multiple of ``GEMM_MULTIPLE``: (padded width, d_model)."""
        weight = self.in_proj.weight
        return F.pad(weight, (0, 0, 0, -weight.shape[0] % GEMM_MULTIPLE))

    def in_projection(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, l, d_model) -> the gate z (b, l, d_inner) and xBCdt (b, l, conv_dim + nheads + pad), views of one
        GEMM whose output width is padded to a multiple of ``GEMM_MULTIPLE`` (the pad columns are zero and
        unused; they keep every row aligned, for the GEMM and for causal-conv1d's channel-last reads). ``weight``:
        ``padded_in_weight()`` computed beforehand (``Scan2D.freeze``); by default computed here."""
        zxbcdt = F.linear(x, self.padded_in_weight() if weight is None else weight)
        return zxbcdt[..., : self.d_inner], zxbcdt[..., self.d_inner:]

    def convolve(self, xBCdt: torch.Tensor, to_scan: torch.Tensor | None = None,
                 to_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The causal conv and SiLU of the conv channels, causal in l: xBCdt (b, l, >= conv_dim + nheads), the conv
        channels then the raw steps dt, as ``in_projection`` gives them -> (b', l, >= conv_dim + nheads): x, B and C
        after the conv, then dt as it was (what ``scan`` takes). Without ``to_scan``, along l as given (b' = b; the
        conv's output and xBCdt's other columns concatenated, ``mamba_ops.causal_conv1d_silu_columns``); with it,
        along S sequences of xBCdt's rows (``to_scan`` (S * l,), ``to_rows`` (l, S), see ``scan_gathers``; b' = b *
        S), which on CUDA one Triton kernel reads in place and writes in one tensor with the columns after the conv's
        (``mamba_ops.gathered_causal_conv1d_silu``)."""
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        if to_scan is None:
            return causal_conv1d_silu_columns(xBCdt, weight, bias, self.conv_dim, self._conv_kernel)
        return gathered_causal_conv1d_silu(xBCdt, to_scan, to_rows, weight, bias, self.conv_dim, self.fused(xBCdt),
                                           self._conv_kernel)

    def scan(self, xBCdt: torch.Tensor) -> torch.Tensor:
        """The SSD scan with its D skip, causal in l: xBCdt (b, l, >= conv_dim + nheads), x, B and C after the conv
        and SiLU, then the raw steps dt, as ``convolve`` gives them -> y (b, l, d_inner), before gate and norm. On the
        CUDA kernels the scan takes xBCdt whole (``mamba_ops.ssd_scan``), so its gradient comes back as one tensor."""
        A = -torch.exp(at_least_fp32(self.A_log))  # (h,)
        if self.fused(xBCdt):
            y = ssd_scan(xBCdt, A, self.D, self.dt_bias, self.headdim, self.d_state, self.ngroups, self.chunk_size)
        else:
            x, dt, B, C = scan_parts(xBCdt, self.nheads, self.headdim, self.d_state, self.ngroups)
            y = ssd_reference(x, dt, A, B, C, self.D, self.dt_bias, self.chunk_size)
        return y.flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, l, d_model) -> (b, l, d_model), causal in l."""
        z, xBCdt = self.in_projection(x)
        y = self.scan(self.convolve(xBCdt))
        rows = torch.arange(y.shape[1], device=y.device)[:, None]  # each token's one output, in place
        return self.out_proj(self.norm(y, rows, z.flatten(0, 1), self.fused(y)).view_as(y))


def scan_orders(grid: tuple[int, int], order: str, bidirectional: bool, device: torch.device) -> torch.Tensor:
    """Row-major token indices in scan order: (S, h * w) long, one row per scan sequence.

    order "w" follows the rows (the row-major order itself), "h" the columns (down each column, column after
    column); ``bidirectional`` adds the same sequence reversed as a second row.
    """
    h, w = grid
    tokens = torch.arange(h * w, device=device)
    if order == "h":
        tokens = tokens.view(h, w).t().reshape(-1)
    return torch.stack([tokens, tokens.flip(0)]) if bidirectional else tokens[None]


def scan_gathers(orders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token maps of ``Scan2D`` for scan orders (S, N): into the sequences and back to row-major order.

    Returns ``to_scan`` (S * N,): the row-major token of each sequence position, sequence after sequence (the gather
    into the sequences); ``to_rows`` (N, S): for each token and sequence, its position among the S * N sequence
    positions (where the gated norm reads the token's outputs, and where the gather's backward reads each token's
    gradients).
    """
    S, N = orders.shape
    offsets = torch.arange(S, device=orders.device)[:, None]
    positions = torch.arange(N, device=orders.device).expand(S, N)
    inverse = torch.empty_like(orders).scatter_(1, orders, positions)  # inverse[s, token] = its position in s
    return orders.reshape(-1), (inverse + N * offsets).t().contiguous()


class Scan2D(nn.Module):
    """Mamba-2 token mixer over an (h x w) grid of tokens in row-major order (row i, column j -> i * w + j).

    order "w" (width-first) scans the tokens in their row-major order: along each row, row after row.
    order "h" (height-first) scans them column-major: down each column, column after column.
    bidirectional: the scan sequence and its reversal run through the same ``mamba`` in one batched call, and
    ``fuse`` (Linear(2C, C)) mixes the two outputs [forward, backward] of each token, so each token sees the whole
    grid. Otherwise one causal scan, no ``fuse``.

    The result equals ``fuse(cat[mamba(seq), flip(mamba(flip(seq)))])`` (``seq`` the tokens in scan order, put
    back in row-major order), computed without repeating per-token work: ``in_proj`` runs once on the row-major
    tokens; the conv reads its conv and dt channels into the S scan sequences (``Mamba2.convolve``, on CUDA
    without a gathered copy); the scan runs on those; the gated norm reads each token's S outputs where the scan
    left them (through ``to_rows``), normalises them against the token's one gate z and writes them in row-major
    order; ``out_proj`` and ``fuse`` are folded into one GEMM of width 2 * d_inner when there are more tokens than
    d_inner or the module is frozen (else out_proj then fuse, which costs less then).

    ``freeze`` (sampling, through ``Backbone.frozen``) computes the weights derived from the parameters (in_proj's
    padded weight, the folded projection) once rather than on every call.

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
        self.frozen = False
        self._in_weight: torch.Tensor | None = None  # the derived weights of the last ``freeze`` (kept after it)
        self._folded: torch.Tensor | None = None

    @torch.no_grad()
    def freeze(self, dtype: torch.dtype) -> None:
        """Compute in_proj's padded weight and (bidirectional) the folded projection once, in ``dtype``: ``forward``
        uses them instead of deriving them on each call until ``frozen`` is set False; the parameters must not change
        meanwhile. They are kept afterwards and the next ``freeze`` refreshes them in place, so a CUDA graph captured
        while frozen reads the current weights when it is replayed under a later ``freeze``."""
        self._in_weight = _refreshed(self._in_weight, self.mamba.padded_in_weight().to(dtype))
        if self.bidirectional:
            self._folded = _refreshed(self._folded, self.folded_weight().to(dtype))
        self.frozen = True

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        h, w = grid
        if h * w != N:
            raise ValueError(f"grid {h}x{w} has {h * w} tokens but the input has {N}")
        mamba = self.mamba
        # (B, N, d_inner), (B, N, conv_dim + nheads + pad)
        z, xBCdt = mamba.in_projection(x, self._in_weight if self.frozen else None)
        orders = scan_orders(grid, self.order, self.bidirectional, x.device)  # (S, N)
        S = orders.shape[0]
        to_scan, to_rows = scan_gathers(orders)
        y = mamba.scan(mamba.convolve(xBCdt, to_scan, to_rows)).reshape(B, S * N, -1)  # (B, S * N, d_inner)
        y = mamba.norm(y, to_rows, z.flatten(0, 1), mamba.fused(y))  # (B * N, S, d_inner): back in row-major order
        return self.project(y.view(B, N, S, -1))

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """Gated-normed scan outputs y (B, N, S, d_inner) -> (B, N, C): ``fuse(cat[out_proj(y_s)])``."""
        weight = self.mamba.out_proj.weight  # (C, d_inner)
        if not self.bidirectional:
            return F.linear(y[:, :, 0], weight)
        if y.shape[0] * y.shape[1] <= y.shape[-1] and not self.frozen:  # few tokens: folding costs more than it saves
            return self.fuse(F.linear(y, weight).flatten(2))
        return F.linear(y.flatten(2), self._folded if self.frozen else self.folded_weight(), self.fuse.bias)

    def folded_weight(self) -> torch.Tensor:
        """out_proj folded into fuse: (C, 2 * d_inner), [fuse_0 @ out_proj, fuse_1 @ out_proj] (bidirectional)."""
        return torch.cat([part @ self.mamba.out_proj.weight for part in self.fuse.weight.chunk(2, dim=1)], dim=1)


def _refreshed(kept: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into ``kept`` where it fits (same shape, dtype and device), keeping its address; else
    ``value``."""
    if kept is not None and (kept.shape, kept.dtype, kept.device) == (value.shape, value.dtype, value.device):
        return kept.copy_(value)
    return value
