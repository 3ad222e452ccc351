"""Triton kernels of ``Scan2D``'s two steps that meet the scan orders: into the scan sequences and out of them.

``Scan2D`` runs ``in_proj`` once on the row-major tokens and the conv and scan on S scan sequences (the tokens in
other orders). Each kernel here reads rows through an index where a gather would otherwise copy them first:

- ``gather_causal_conv1d_silu``: the sequences' causal depthwise conv and SiLU, each step reading its row of
  ``in_proj``'s output where it lies (and the columns after the conv channels, the raw steps dt, copied beside);
- ``gated_rms_norm_rows``: Mamba-2's gated RMSNorm of every token's S scan outputs, read where the scan left them,
  against the token's one gate z, written in row-major order; one program normalises one token's S outputs in one
  channel group, reading its gate once, in float32 as mamba-ssm's one-pass kernel does.

The forwards of the custom ops ``lit_dimba::gather_conv1d_silu`` and ``lit_dimba::gated_rms_norm_forward`` on CUDA
(``mamba_ops``, which also holds their backwards and PyTorch forms). This module imports triton: load it through
``mamba_ops.scan2d_kernels()``, which is None where triton does not import. A CPU tensor runs in Triton's
interpreter (TRITON_INTERPRET=1, tests).
"""

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_rms_norm_rows(Y, ROWS, Z, W, OUT, RSTD, stride_y, stride_z, tokens, eps, S: tl.constexpr,
                         GROUP: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # b * tokens + t: the gate's row, and the output's rows token * S + s
    group = tl.program_id(1)
    ngroups = tl.num_programs(1)
    rows = tl.num_programs(0)  # b * tokens
    cols = group * GROUP + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GROUP
    z = tl.load(Z + token * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    gate = z * tl.sigmoid(z)  # read once for the token's S outputs
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    first = (token // tokens) * (tokens * S)  # batch element b's first row of Y
    for s in tl.static_range(S):
        source = first + tl.load(ROWS + (token % tokens) * S + s)
        u = tl.load(Y + source * stride_y + cols, mask=mask, other=0.0).to(tl.float32) * gate
        rstd = 1 / tl.sqrt(tl.sum(u * u, axis=0) / GROUP + eps)
        tl.store(OUT + (token * S + s) * (GROUP * ngroups) + cols, u * rstd * w, mask=mask)
        # rstd as mamba-ssm's backward reads it, one vector per output s: [s, group * rows + token]
        tl.store(RSTD + s * (ngroups * rows) + group * rows + token, rstd)


def gated_rms_norm_rows(y: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rmsnorm(y[b, rows[t, s]] * silu(z[b * n + t])) * weight for every batch element b, token t and order s.

    y (b, m, d) with unit stride along d (rows may be strided), rows (n, S) int64 with n * S = m, z (b * n, d) with
    unit stride along d, weight (d,) -> (out (b * n, S, d) contiguous in y.dtype, rstd (S, d / group_size * b * n)
    float32, laid out as mamba-ssm's ``_layer_norm_bwd`` takes it for output s).
    """
    b, m, d = y.shape
    n, S = rows.shape
    if n * S != m or z.shape != (b * n, d) or y.stride(2) != 1 or z.stride(1) != 1 or y.stride(0) != m * y.stride(1):
        raise ValueError(f"gated_rms_norm_rows: y {tuple(y.shape)} (strides {y.stride()}), rows {tuple(rows.shape)}, "
                         f"z {tuple(z.shape)} (strides {z.stride()}) do not fit")
    out = torch.empty(b * n, S, d, dtype=y.dtype, device=y.device)
    rstd = torch.empty(S, d // group_size * b * n, dtype=torch.float32, device=y.device)
    block = triton.next_power_of_2(group_size)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():  # (a CPU y: the interpreter)
        _gated_rms_norm_rows[(b * n, d // group_size)](
            y, rows.contiguous(), z, weight.contiguous(), out, rstd, y.stride(1), z.stride(0), n, eps, S=S,
            GROUP=group_size, BLOCK=block, num_warps=min(max(block // 256, 1), 8))
    return out, rstd


@triton.jit
def _gather_causal_conv1d_silu(X, INDEX, W, BIAS, OUT, stride_x, length, width, channels, S: tl.constexpr,
                               K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    sequence = tl.program_id(2).to(tl.int64)  # b * S + s
    steps = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_sequence, in_row, conv = steps < length, cols < width, cols < channels
    first = (sequence // S) * length  # batch element b's first row of X
    index = INDEX + (sequence % S) * length  # the row of each step of sequence s
    token = tl.load(index + steps, mask=in_sequence, other=0)
    x = tl.load(X + (first + token)[:, None] * stride_x + cols[None, :], mask=in_sequence[:, None] & in_row[None, :],
                other=0.0)
    acc = x.to(tl.float32) * tl.load(W + cols * K + (K - 1), mask=conv, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(BIAS + cols, mask=conv, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K - 1):  # tap k meets the step K - 1 - k places back (none before the first step)
        back = steps - (K - 1 - k)
        valid = in_sequence & (back >= 0)
        token = tl.load(index + back, mask=valid, other=0)
        earlier = tl.load(X + (first + token)[:, None] * stride_x + cols[None, :], mask=valid[:, None] & conv[None, :],
                          other=0.0)
        acc += earlier.to(tl.float32) * tl.load(W + cols * K + k, mask=conv, other=0.0).to(tl.float32)[None, :]
    out = tl.where(conv[None, :], acc * tl.sigmoid(acc), x.to(tl.float32))
    tl.store(OUT + (sequence * length + steps)[:, None] * width + cols[None, :], out,
             mask=in_sequence[:, None] & in_row[None, :])


def gather_causal_conv1d_silu(x: torch.Tensor, to_scan: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              channels: int) -> torch.Tensor:
    """S sequences of x's rows, their first ``channels`` columns through a causal depthwise conv and SiLU.

    x (b, m, w) with unit stride along w (rows may be strided), to_scan (S * m,) int64: the row of x at each step
    of sequence s (``to_scan[s * m + step]``), weight (channels, k) and bias (channels,), applied in x.dtype as
    causal-conv1d does -> (b * S, m, w) contiguous in x.dtype: columns up to ``channels`` the conv's SiLU, the
    others x's own.
    """
    b, m, w = x.shape
    S = to_scan.numel() // m
    if S * m != to_scan.numel() or x.stride(2) != 1 or x.stride(0) != m * x.stride(1) or weight.shape[0] != channels:
        raise ValueError(f"gather_causal_conv1d_silu: x {tuple(x.shape)} (strides {x.stride()}), to_scan "
                         f"{tuple(to_scan.shape)}, weight {tuple(weight.shape)} do not fit")
    out = torch.empty(b * S, m, w, dtype=x.dtype, device=x.device)
    block_l, block_d = 32, 128
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # (a CPU x: the interpreter)
        _gather_causal_conv1d_silu[(triton.cdiv(m, block_l), triton.cdiv(w, block_d), b * S)](
            x, to_scan.contiguous(), weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous(), out, x.stride(1),
            m, w, channels, S=S, K=weight.shape[1], BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)
    return out
