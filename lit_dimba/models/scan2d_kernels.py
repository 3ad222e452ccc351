"""Triton kernels of ``Scan2D``'s two steps that meet the scan orders: into the scan sequences and out of them.

``Scan2D`` runs ``in_proj`` once on the row-major tokens and the conv and scan on S scan sequences (the tokens in
other orders). Each kernel here reads rows through an index where a gather would otherwise copy them first:

- ``gather_causal_conv1d_silu``: the sequences' causal depthwise conv and SiLU, each step reading its row of
  ``in_proj``'s output where it lies (and the columns after the conv channels, the raw steps dt, copied beside).
  Its backward takes two passes: the gradient at the SiLU's input in scan order (the conv recomputed as the forward
  reads), then, row by row, each row's sum over the K steps of each sequence that its taps meet, with dweight and
  dbias as per-program partial sums;
- ``gated_rms_norm_rows``: Mamba-2's gated RMSNorm of every token's S scan outputs, read where the scan left them,
  against the token's one gate z, written in row-major order; one program normalises one token's S outputs in one
  channel group, reading its gate once, in float32 as mamba-ssm's one-pass kernel does. Its backward reads the
  same rows, recomputes the RMS, writes dy where y lies and dz once per token.

The kernels of the custom ops ``lit_dimba::gather_conv1d_silu`` and ``lit_dimba::gated_rms_norm_forward``, forward
and backward, on CUDA (``mamba_ops``, which also holds their PyTorch forms). This module imports triton: load it
through ``mamba_ops.scan2d_kernels()``, which is None where triton does not import. A CPU tensor runs in Triton's
interpreter (TRITON_INTERPRET=1, tests).
"""

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_rms_norm_rows(Y, ROWS, Z, W, OUT, stride_y, stride_z, tokens, eps, S: tl.constexpr, S_BLOCK: tl.constexpr,
                         GROUP: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # b * tokens + t: the gate's row, and the output's rows token * S + s
    group = tl.program_id(1)
    ngroups = tl.num_programs(1)
    cols = group * GROUP + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GROUP
    s = tl.arange(0, S_BLOCK)  # the token's S outputs as one (S_BLOCK, BLOCK) tile: all loads issued at once
    both = (s < S)[:, None] & mask[None, :]
    first = (token // tokens) * (tokens * S)  # batch element b's first row of Y
    source = first + tl.load(ROWS + (token % tokens) * S + s, mask=s < S, other=0)
    y = tl.load(Y + source[:, None] * stride_y + cols[None, :], mask=both, other=0.0).to(tl.float32)
    z = tl.load(Z + token * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    u = y * (z * tl.sigmoid(z))[None, :]  # the gate read once for the token's S outputs
    rstd = 1 / tl.sqrt(tl.sum(u * u, axis=1) / GROUP + eps)
    tl.store(OUT + (token * S + s)[:, None] * (GROUP * ngroups) + cols[None, :], u * rstd[:, None] * w[None, :],
             mask=both)


# The norm's warps, forward and backward: 4 beat 8 and 16 for t2md's tile of 2 x 2304 (padded to 4096) channels on
# an H200. This one-tile form beat a loop over the S outputs by 20 to 25% forward and about 2x backward (1024^2:
# 164 -> 86 us, 2048^2: 574 -> 267 us).
NORM_WARPS = 4


# The norm's backward sums dweight over per-program partial sums; each program takes several tokens while there are
# more than this many.
NORM_BACKWARD_PROGRAMS = 1024


@triton.jit
def _gated_rms_norm_rows_backward(GRAD, Y, ROWS, Z, W, DY, DZ, DW, stride_y, stride_z, tokens, total, per_program, eps,
                                  S: tl.constexpr, S_BLOCK: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    group = tl.program_id(1)
    width = GROUP * tl.num_programs(1)
    cols = group * GROUP + tl.arange(0, BLOCK)
    in_group = tl.arange(0, BLOCK) < GROUP
    s = tl.arange(0, S_BLOCK)  # a token's S outputs as one (S_BLOCK, BLOCK) tile, as in the forward
    w = tl.load(W + cols, mask=in_group, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)  # this program's share of dweight, summed over its tokens
    for i in range(0, per_program):
        token = (program * per_program + i).to(tl.int64)  # b * tokens + t
        valid = token < total
        mask = in_group & valid
        in_s = (s < S) & valid
        both = in_s[:, None] & in_group[None, :]
        z = tl.load(Z + token * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
        sigmoid = tl.sigmoid(z)
        gate = z * sigmoid
        dgate = sigmoid * (1 + z * (1 - sigmoid))  # d silu(z) / dz
        rows = (token // tokens) * (tokens * S) + tl.load(ROWS + (token % tokens) * S + s, mask=in_s, other=0)
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=both, other=0.0).to(tl.float32)
        grad = tl.load(GRAD + (token * S + s)[:, None] * width + cols[None, :], mask=both, other=0.0).to(tl.float32)
        u = y * gate[None, :]
        rstd = 1 / tl.sqrt(tl.sum(u * u, axis=1) / GROUP + eps)
        normed = u * rstd[:, None]
        dw += tl.sum(grad * normed, axis=0)
        dnormed = grad * w[None, :]
        du = (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / GROUP)[:, None]) * rstd[:, None]
        tl.store(DY + rows[:, None] * width + cols[None, :], du * gate[None, :], mask=both)
        tl.store(DZ + token * width + cols, tl.sum(du * y, axis=0) * dgate, mask=mask)
    tl.store(DW + program * width + cols, dw, mask=in_group)


def _check_norm_inputs(y: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, what: str) -> None:
    b, m, d = y.shape
    n, S = rows.shape
    if n * S != m or z.shape != (b * n, d) or y.stride(2) != 1 or z.stride(1) != 1 or y.stride(0) != m * y.stride(1):
        raise ValueError(f"{what}: y {tuple(y.shape)} (strides {y.stride()}), rows {tuple(rows.shape)}, z "
                         f"{tuple(z.shape)} (strides {z.stride()}) do not fit")


def _device(t: torch.Tensor):
    """The CUDA device of ``t`` as the current one while a kernel launches; nothing for a CPU tensor (Triton's
    interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _norm_tile(S: int, group_size: int) -> dict:
    """The norm kernels' launch options, forward and backward: a token's S outputs in one group of channels as one
    tile, both sides padded to a power of 2."""
    return {"S_BLOCK": triton.next_power_of_2(S), "BLOCK": triton.next_power_of_2(group_size),
            "num_warps": NORM_WARPS}


def gated_rms_norm_rows(y: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                        eps: float) -> torch.Tensor:
    """rmsnorm(y[b, rows[t, s]] * silu(z[b * n + t])) * weight for every batch element b, token t and order s.

    y (b, m, d) with unit stride along d (rows may be strided), rows (n, S) int64 with n * S = m, z (b * n, d) with
    unit stride along d, weight (d,) -> (b * n, S, d) contiguous in y.dtype.
    """
    _check_norm_inputs(y, rows, z, "gated_rms_norm_rows")
    b, m, d = y.shape
    n, S = rows.shape
    out = torch.empty(b * n, S, d, dtype=y.dtype, device=y.device)
    with _device(y):
        _gated_rms_norm_rows[(b * n, d // group_size)](
            y, rows.contiguous(), z, weight.contiguous(), out, y.stride(1), z.stride(0), n, eps, S=S,
            GROUP=group_size, **_norm_tile(S, group_size))
    return out


def gated_rms_norm_rows_backward(grad: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, z: torch.Tensor,
                                 weight: torch.Tensor, group_size: int, eps: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``gated_rms_norm_rows`` for ``grad`` (b * n, S, d) contiguous: (dy (b, m, d) contiguous, each
    output's gradient at its row of y, in y.dtype; dz (b * n, d) contiguous in z.dtype, summed over the S outputs;
    dweight (d,) in weight.dtype). One program per group of channels and run of tokens reads each token's gate once
    and its S outputs where they lie, recomputing the RMS; dweight is summed over the programs' partial sums."""
    _check_norm_inputs(y, rows, z, "gated_rms_norm_rows_backward")
    b, m, d = y.shape
    n, S = rows.shape
    if grad.shape != (b * n, S, d) or not grad.is_contiguous():
        raise ValueError(f"gated_rms_norm_rows_backward: grad {tuple(grad.shape)} (strides {grad.stride()}) is not a "
                         f"contiguous ({b * n}, {S}, {d})")
    total = b * n
    per_program = triton.cdiv(total, min(total, NORM_BACKWARD_PROGRAMS))  # tokens per program
    programs = triton.cdiv(total, per_program)
    dy = torch.empty(b, m, d, dtype=y.dtype, device=y.device)
    dz = torch.empty(total, d, dtype=z.dtype, device=z.device)
    dweight = torch.empty(programs, d, dtype=torch.float32, device=y.device)
    with _device(y):
        _gated_rms_norm_rows_backward[(programs, d // group_size)](
            grad, y, rows.contiguous(), z, weight.contiguous(), dy, dz, dweight, y.stride(1), z.stride(0), n, total,
            per_program, eps, S=S, GROUP=group_size, **_norm_tile(S, group_size))
    return dy, dz, dweight.sum(0).to(weight.dtype)


@triton.jit
def _conv_along_sequence(X, INDEX, W, BIAS, stride_x, length, sequence, steps, cols, in_row, conv, S: tl.constexpr,
                         K: tl.constexpr):
    # The conv's pre-activation at ``steps`` of ``sequence`` (b * S + s) in columns ``cols`` (float32, (steps, cols);
    # 0 in the columns past ``conv``) and the steps' own rows there, in X's dtype.
    in_sequence = steps < length
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
    return acc, x


@triton.jit
def _gather_causal_conv1d_silu(X, INDEX, W, BIAS, OUT, stride_x, length, width, channels, S: tl.constexpr,
                               K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    sequence = tl.program_id(2).to(tl.int64)  # b * S + s
    steps = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row, conv = cols < width, cols < channels
    acc, x = _conv_along_sequence(X, INDEX, W, BIAS, stride_x, length, sequence, steps, cols, in_row, conv, S, K)
    out = tl.where(conv[None, :], acc * tl.sigmoid(acc), x.to(tl.float32))
    tl.store(OUT + (sequence * length + steps)[:, None] * width + cols[None, :], out,
             mask=(steps < length)[:, None] & in_row[None, :])


@triton.jit
def _conv_silu_grad(GRAD, X, INDEX, W, BIAS, DPRE, stride_x, length, width, channels, S: tl.constexpr,
                    K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # The backward's first pass, in scan order as the forward reads: the gradient at the SiLU's input.
    sequence = tl.program_id(2).to(tl.int64)  # b * S + s
    steps = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    conv = cols < channels
    acc, _ = _conv_along_sequence(X, INDEX, W, BIAS, stride_x, length, sequence, steps, cols, conv, conv, S, K)
    mask = (steps < length)[:, None] & conv[None, :]
    g = tl.load(GRAD + (sequence * length + steps)[:, None] * width + cols[None, :], mask=mask, other=0.0)
    sigmoid = tl.sigmoid(acc)
    tl.store(DPRE + (sequence * length + steps)[:, None] * channels + cols[None, :],
             g.to(tl.float32) * sigmoid * (1 + acc * (1 - sigmoid)), mask=mask)


@triton.jit
def _conv_rows_grad(GRAD, DPRE, X, INDEX, ROWS, W, DX, PARTIAL, stride_x, length, width, channels, S: tl.constexpr,
                    K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # The backward's second pass, row by row: each row's gradient, the sum over its S sequences of the SiLU-input
    # gradients at the K steps its taps meet (and of the passed-through columns' gradients), and this program's share
    # of dweight and dbias, from the same loads. Taps outer, sequences inner: a tap's gradients of the S sequences
    # are summed elementwise first, so the partial sums take K + 1 reductions over the block's steps, not S * (K + 1).
    batch = tl.program_id(2).to(tl.int64)
    # a block of steps of sequence 0: their rows, each met once, are the rows this program writes
    steps = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_block, in_row, conv = steps < length, cols < width, cols < channels
    token = tl.load(INDEX + steps, mask=in_block, other=0)
    own = tl.load(X + (batch * length + token)[:, None] * stride_x + cols[None, :],
                  mask=in_block[:, None] & conv[None, :], other=0.0).to(tl.float32)
    dx = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(S):  # the passed-through columns' gradients at the row's own steps
        position = tl.load(ROWS + token * S + s, mask=in_block, other=0) - s * length  # the row's step in sequence s
        passed = tl.load(GRAD + ((batch * S + s) * length + position)[:, None] * width + cols[None, :],
                         mask=in_block[:, None] & in_row[None, :] & (cols >= channels)[None, :], other=0.0)
        dx += passed.to(tl.float32)
    # this program's K + 1 rows of partial sums: dweight's K taps, then dbias
    partial = PARTIAL + (batch * tl.num_programs(0) + tl.program_id(0)) * (K + 1) * channels + cols
    for j in tl.static_range(K):  # the step j places later, where the row meets tap K - 1 - j
        d = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(S):
            later = tl.load(ROWS + token * S + s, mask=in_block, other=0) - s * length + j
            d += tl.load(DPRE + ((batch * S + s) * length + later)[:, None] * channels + cols[None, :],
                         mask=(in_block & (later < length))[:, None] & conv[None, :], other=0.0).to(tl.float32)
        dx += d * tl.load(W + cols * K + (K - 1 - j), mask=conv, other=0.0).to(tl.float32)[None, :]
        tl.store(partial + (K - 1 - j) * channels, tl.sum(d * own, axis=0), mask=conv)
        if j == 0:
            tl.store(partial + K * channels, tl.sum(d, axis=0), mask=conv)
    tl.store(DX + (batch * length + token)[:, None] * width + cols[None, :], dx,
             mask=in_block[:, None] & in_row[None, :])


# The conv's tile, steps x columns, and warps, forward and the backward's first pass: the best shared setting of a sweep
# on an H200 (torch 2.11, Triton 3.6) at t2md's 512^2 batch-32 and 2048^2 batch-2 training shapes, per layer: 16 x 128
# on 2 warps took 318 and 342 us forward, 359 and 389 backward, against 330, 351, 446 and 491 for 32 x 128 on 4 warps
# (2026-11-30).
BLOCK_L, BLOCK_D, WARPS = 16, 128, 2
# The backward's second pass (_conv_rows_grad) has a setting of its own. On one warp its per-program partial sums of
# dweight and dbias are reductions within the warp (shuffles, no shared memory and barriers): 32 x 64 on 1 warp took 393
# and 403 us per layer at those shapes, 64 x 64 on 4 warps 705 and 716, 16 x 64 on 1 warp 458 and 468 (2026-11-30).
ROWS_BLOCK_L, ROWS_BLOCK_D, ROWS_WARPS = 32, 64, 1


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
    with _device(x):
        _gather_causal_conv1d_silu[(triton.cdiv(m, BLOCK_L), triton.cdiv(w, BLOCK_D), b * S)](
            x, to_scan.contiguous(), weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous(), out, x.stride(1),
            m, w, channels, S=S, K=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=WARPS)
    return out


def gather_causal_conv1d_silu_backward(grad: torch.Tensor, x: torch.Tensor, to_scan: torch.Tensor,
                                       to_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, channels: int
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``gather_causal_conv1d_silu`` for ``grad`` (b * S, m, w) contiguous: (dx (b, m, w) contiguous
    in x.dtype, each row's the sum over its S sequence steps; dweight (channels, k) and dbias in their dtypes).
    to_rows (m, S): the position of each row among the S * m sequence steps (``to_scan``'s inverse).

    Two passes. The first, in scan order as the forward reads (each step's rows where they lie), recomputes the conv
    and writes the gradient at the SiLU's input, (b * S, m, channels) in x.dtype. The second, row by row, sums for
    each row the gradients at the K steps of each sequence that its taps meet (and the passed-through columns'
    gradients at its own steps), and with the row itself the per-program partial sums of dweight and dbias (no
    atomic adds: deterministic). No gathered copy of the rows, no gradient in scan order for the other columns.
    """
    b, m, w = x.shape
    S, k = to_scan.numel() // m, weight.shape[1]
    if (S * m != to_scan.numel() or to_rows.shape != (m, S) or grad.shape != (b * S, m, w) or not grad.is_contiguous()
            or x.stride(2) != 1 or x.stride(0) != m * x.stride(1) or weight.shape[0] != channels):
        raise ValueError(f"gather_causal_conv1d_silu_backward: grad {tuple(grad.shape)}, x {tuple(x.shape)} (strides "
                         f"{x.stride()}), to_scan {tuple(to_scan.shape)}, to_rows {tuple(to_rows.shape)}, weight "
                         f"{tuple(weight.shape)} do not fit")
    to_scan = to_scan.contiguous()
    # in x.dtype, as the forward applies them
    applied, bias_applied = weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous()
    dpre = torch.empty(b * S, m, channels, dtype=x.dtype, device=x.device)
    dx = torch.empty(b, m, w, dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(m, ROWS_BLOCK_L)  # the second pass's programs along the steps, one row of partial sums each
    partial = torch.empty(b, blocks, k + 1, channels, dtype=torch.float32, device=x.device)
    with _device(x):
        _conv_silu_grad[(triton.cdiv(m, BLOCK_L), triton.cdiv(channels, BLOCK_D), b * S)](
            grad, x, to_scan, applied, bias_applied, dpre, x.stride(1), m, w, channels, S=S, K=k, BLOCK_L=BLOCK_L,
            BLOCK_D=BLOCK_D, num_warps=WARPS)
        _conv_rows_grad[(blocks, triton.cdiv(w, ROWS_BLOCK_D), b)](
            grad, dpre, x, to_scan, to_rows.contiguous(), applied, dx, partial, x.stride(1), m, w, channels, S=S, K=k,
            BLOCK_L=ROWS_BLOCK_L, BLOCK_D=ROWS_BLOCK_D, num_warps=ROWS_WARPS)
    sums = partial.sum((0, 1))  # (k + 1, channels)
    return dx, sums[:k].t().contiguous().to(weight.dtype), sums[k].to(bias.dtype)
