"""Vision Mamba's bidirectional Mamba-1 mixer ("bimamba v2"), the token mixer of the released Dimba's Mamba blocks.

What was read (feizc/Dimba at 05e20a7, which vendors Vision Mamba's mamba-ssm fork):
``mamba/mamba_ssm/modules/mamba_simple.py``, class ``Mamba`` with ``bimamba_type="v2"`` (the value Dimba's
``create_block`` passes), its fast path ``forward`` -> ``mamba_inner_fn_no_out_proj`` once on the sequence and once
on the sequence flipped, and ``mamba/mamba_ssm/ops/selective_scan_interface.py``, ``MambaInnerFnNoOutProj.forward``
(causal depthwise conv with SiLU, ``x_proj``, ``dt_proj`` without its bias, the selective scan with
``delta_bias = dt_proj.bias``, softplus, D and the z gate). The same layer is hustvl/Vim's
``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``.

Shapes: b batch, l sequence length, E = expand * d_model inner channels, n state size, R dt rank, k conv width.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lit_dimba.errors import ConfigError
from lit_dimba.models.mamba import KERNELS, initial_dt_bias
from lit_dimba.models.mamba_ops import at_least_fp32, causal_conv1d_kernel, causal_conv1d_silu, selective_scan, \
    selective_scan_kernel


class BiMamba(nn.Module):
    """Bidirectional Mamba-1 mixer with the released Dimba's parameter names and shapes. (b, l, d_model) -> same.

    ``in_proj`` (no bias) gives x and the gate z, E channels each. Two branches with their own weights run on x:
    forward (``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``) on the sequence, backward (``conv1d_b``,
    ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``) on the sequence reversed. Each: causal depthwise conv and
    SiLU; ``x_proj`` (no bias) splits into dt (R), B (n), C (n); delta = dt_proj.weight @ dt; the selective scan with
    A = -exp(A_log), steps softplus(delta + dt_proj.bias), skip D, gated by silu(z) (z reversed for the backward
    branch). The backward output is reversed back, the two are summed and ``out_proj`` (no bias) maps them to
    d_model:

        out = out_proj(scan_f(x) * silu(z) + flip(scan_b(flip(x)) * silu(flip(z))))

    Computed as one scan: the backward branch's channels are E more channels, fed the reversed sequence, with B and
    C as a second group (one conv, one scan call for both directions).

    Args:
        d_model: token width; E = expand * d_model.
        d_state, d_conv, expand: n, k and the expansion (the release: 16, 4, 2).
        dt_rank: R, or "auto" for ceil(d_model / 16) (the release).
        dt_min, dt_max, dt_init_floor, dt_scale: initialisation of ``dt_proj`` (``init_ssm_parameters``).
        chunk_size: T of the PyTorch scan (``mamba_ops.selective_scan_reference``).
        kernel: "auto": mamba-ssm's ``selective_scan_fn`` for CUDA inputs where its CUDA extension is built, else
            PyTorch; "torch": PyTorch always; "mamba_ssm": mamba-ssm's kernel always (a ConfigError if it cannot
            run). Except with "torch", the conv runs causal-conv1d's CUDA kernel where it is installed.

    Initialisation (mamba-ssm's ``Mamba``): PyTorch's defaults for the projections and convs, ``dt_proj`` weights
    uniform in +-dt_scale / sqrt(R), its bias softplus^-1 of a step log-uniform in [dt_min, dt_max], A = 1..n in
    every channel (S4D real), D = 1, in both branches; a model that re-initialises its linears calls
    ``reset_parameters`` afterwards. A_log, D, A_b_log, D_b carry ``_no_weight_decay = True`` as in the release.
    (The release's own ``Dimba.initialize`` xavier-initialises every linear, these included, and zeroes every
    bias, dt_proj's too; what matters here is loading its trained weights.)
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        chunk_size: int = 16,
        kernel: str = "auto",
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError(f"unknown BiMamba kernel {kernel!r}; choose one of {KERNELS}: 'auto' (mamba-ssm's "
                              "selective_scan_fn on CUDA when built, else PyTorch), 'torch' or 'mamba_ssm' (CUDA only)")
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ConfigError(f"mamba1.dt_rank is {dt_rank!r}; give a positive int or 'auto' (ceil(d_model / 16))")
        self.d_inner = d_inner = expand * d_model
        self.d_state, self.chunk_size, self.kernel = d_state, chunk_size, kernel
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale

        def conv():
            return nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1, bias=True)

        # Registered in the release's order, so state dicts list the tensors as its checkpoints do.
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = conv()
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.A_b_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.conv1d_b = conv()
        self.x_proj_b = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.D_b = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for param in (self.A_log, self.D, self.A_b_log, self.D_b):
            param._no_weight_decay = True
        self.init_ssm_parameters()

        # Resolved once here, not while torch.compile traces.
        self._has_kernel = kernel != "torch" and selective_scan_kernel() is not None
        self._conv_kernel = None if kernel == "torch" else causal_conv1d_kernel()

    def reset_parameters(self):
        """mamba-ssm's initialisation of everything a surrounding model's init may overwrite: PyTorch-default
        ``in_proj``, ``x_proj``, ``x_proj_b`` and ``out_proj``, and ``init_ssm_parameters``."""
        for linear in (self.in_proj, self.x_proj, self.x_proj_b, self.out_proj):
            linear.reset_parameters()
        self.init_ssm_parameters()

    @torch.no_grad()
    def init_ssm_parameters(self):
        """mamba-ssm's ``Mamba`` init of both branches: dt_proj.weight uniform in +-dt_scale / sqrt(R);
        dt_proj.bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (at least dt_init_floor);
        A_log = log(1..n) in every channel; D = 1."""
        std = self.dt_rank**-0.5 * self.dt_scale
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        for dt_proj, A_log, D in ((self.dt_proj, self.A_log, self.D), (self.dt_proj_b, self.A_b_log, self.D_b)):
            dt_proj.weight.uniform_(-std, std)
            dt_proj.bias.copy_(initial_dt_bias(self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor))
            A_log.copy_(A.log())
            D.fill_(1.0)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether this call uses mamba-ssm's scan kernel (see ``kernel``); a ConfigError if forced but impossible."""
        available = x.is_cuda and self._has_kernel
        if self.kernel == "mamba_ssm" and not available:
            raise ConfigError(
                f"BiMamba kernel='mamba_ssm' runs mamba-ssm's selective_scan_fn, which needs a CUDA input and "
                f"mamba-ssm with its compiled selective_scan_cuda extension (pip install -e '.[gpu]'); got a "
                f"{x.device.type} input and the kernel {'built' if self._has_kernel else 'not built'}. Set "
                "mamba1.kernel to 'auto' (the kernel where it can run, else PyTorch) or 'torch'")
        return available

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, l, d_model) -> (b, l, d_model); every output token sees the whole sequence."""
        E, R, n = self.d_inner, self.dt_rank, self.d_state
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, E) each
        # channels [0, E): forward branch on the sequence; [E, 2E): backward branch on the reversed sequence
        xs, z = torch.cat([xs, xs.flip(1)], dim=-1), torch.cat([z, z.flip(1)], dim=-1)  # (b, l, 2E)
        conv_weight = torch.cat([self.conv1d.weight, self.conv1d_b.weight])[:, 0]  # (2E, k)
        xs = causal_conv1d_silu(xs, conv_weight, torch.cat([self.conv1d.bias, self.conv1d_b.bias]), self._conv_kernel)
        dbc = torch.stack([F.linear(xs[..., :E], self.x_proj.weight), F.linear(xs[..., E:], self.x_proj_b.weight)],
                          dim=2)  # (b, l, 2, R + 2n): one group per branch
        dt, B, C = dbc.split([R, n, n], dim=-1)
        delta = torch.cat([F.linear(dt[:, :, 0], self.dt_proj.weight), F.linear(dt[:, :, 1], self.dt_proj_b.weight)],
                          dim=-1)  # (b, l, 2E)
        A = -torch.exp(at_least_fp32(torch.cat([self.A_log, self.A_b_log])))  # (2E, n)
        D = torch.cat([self.D, self.D_b])
        delta_bias = torch.cat([self.dt_proj.bias, self.dt_proj_b.bias])
        y = selective_scan(xs, delta, A, B, C, D, delta_bias, z, self.chunk_size, self.fused(xs))  # (b, l, 2E)
        return self.out_proj(y[..., :E] + y[..., E:].flip(1))
