"""Mamba's operators as functions: Mamba-2's selective (SSD) scan, the causal depthwise conv, the gated RMSNorm,
and Mamba-1's selective scan.

Each has a plain-PyTorch form, which runs on any device, is differentiable, and is traced and fused by
``torch.compile``, and an optional CUDA kernel:

- ``ssd_scan``: mamba-ssm's fused Triton SSD scan, registered as the custom op ``lit_dimba::ssd_scan`` with a fake
  (shape) implementation and a backward op, so that ``torch.compile`` keeps it inside the graph rather than
  breaking there; it takes its inputs x, B, C and dt packed in one tensor as the conv gives them (``scan_parts``),
  so that its backward writes their gradients into one tensor, and also returns the forward's chunk states, which
  its backward reuses. Its CPU implementation is ``ssd_reference`` (what ``torch.library.opcheck`` tests on a CPU).
- ``causal_conv1d_silu``: causal-conv1d's CUDA conv when installed (its 1.7 release registers its kernels as
  custom ops, so ``torch.compile`` keeps them in the graph); else the PyTorch form (k shifted multiply-adds), which
  inductor fuses with SiLU.
- ``gated_rms_norm``: rmsnorm(y * silu(z)) * weight for several scan outputs y of a token that share its gate z, read
  from wherever the scan left them (a row index), as the custom op ``lit_dimba::gated_rms_norm_forward``: our
  Triton kernels on CUDA, forward and backward (``scan2d_kernels``: one launch each for every output, no gather),
  ``gated_rms_norm_reference`` elsewhere.
- ``gather_conv1d_silu``: ``causal_conv1d_silu`` along S sequences of rows put in scan orders, as the custom op
  ``lit_dimba::gather_conv1d_silu``: our Triton kernels on CUDA, forward and backward (``scan2d_kernels``: each
  step's row read where it lies, no gathered copy), a gather and the PyTorch form elsewhere.
- ``gather_rows``: the gathers that put tokens into scan order and back, as one ATen kernel each.
- ``selective_scan``: Mamba-1's selective scan (per-channel, per-state decays) with its D skip and z gate:
  mamba-ssm's ``selective_scan_fn`` (the CUDA extension ``selective_scan_cuda``) when it is built, else
  ``selective_scan_reference``, a chunked parallel scan in PyTorch.

Shapes: b batch, l sequence length, h heads, p head dim, g groups (B and C are shared by the h / g heads of a
group; head k reads group k // (h / g)), n state size, T chunk size, c number of chunks, d channels, k conv width.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or in its own dtype when that is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --------------------------------------------------------------------------------------------- PyTorch forms
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


def ssd_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, dt_bias: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mamba-2's scan as mamba-ssm's kernel computes it, in PyTorch: ``ssd_chunked`` with steps
    softplus(dt + dt_bias) plus the skip D x.

    x: (b, l, h, p), dt: (b, l, h) raw steps, A: (h,), B, C: (b, l, g, n), D, dt_bias: (h,).
    Returns (b, l, h, p) in x.dtype, computed in at least float32.
    """
    steps = F.softplus(at_least_fp32(dt) + dt_bias)
    y = ssd_chunked(x, steps, A, B, C, chunk_size) + at_least_fp32(x) * D[:, None]
    return y.to(x.dtype)


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU of a causal depthwise conv along l, written as k shifted multiply-adds (what inductor fuses).

    x: (b, l, d), weight: (d, k), bias: (d,) -> (b, l, d) in x.dtype, computed in at least float32; equal to
    ``silu(nn.Conv1d(d, d, k, groups=d, padding=k - 1)(x^T)[..., :l])^T`` (the tap ``weight[:, k - 1]`` meets the
    current step).
    """
    k, l = weight.shape[1], x.shape[1]
    padded = F.pad(at_least_fp32(x), (0, 0, k - 1, 0))
    out = bias + sum(padded[:, i: i + l] * weight[:, i] for i in range(k))
    return F.silu(out).to(x.dtype)


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                             eps: float) -> torch.Tensor:
    """mamba-ssm's gated RMSNorm (norm_before_gate=False), rmsnorm(y * silu(z)) * weight, the RMS taken over groups
    of ``group_size`` channels, for S outputs y that share one gate z.

    y: (r, S, d), z: (r, d), weight: (d,) -> (r, S, d) in y.dtype, computed in at least float32.
    """
    u = (at_least_fp32(y) * F.silu(at_least_fp32(z))[:, None]).unflatten(-1, (-1, group_size))
    return (u * torch.rsqrt(u.square().mean(-1, keepdim=True) + eps) * weight.unflatten(0, (-1, group_size))
            ).flatten(-2).to(y.dtype)


SCAN_SEGMENT = 4096  # steps of a Mamba-1 sequence scanned at once by the PyTorch form (``selective_scan_reference``)


def _shifted(x: torch.Tensor, step: int, dim: int) -> torch.Tensor:
    """x moved ``step`` places along ``dim`` (>= 0) towards higher indices, zeros coming in at the front."""
    return F.pad(x.narrow(dim, 0, x.shape[dim] - step), [0, 0] * (x.dim() - 1 - dim) + [step, 0])


def linear_scan(log_decay: torch.Tensor, inputs: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence h_t = exp(log_decay_t) h_{t-1} + inputs_t along ``dim`` from h_{-1} = 0, for every position at
    once (Hillis-Steele doubling: ceil(log2 L) elementwise steps over the whole tensor, L the length along ``dim``).

    log_decay, inputs: same shape, log_decay <= 0. Returns (h, the cumulative log-decay log_decay_0 + ... +
    log_decay_t, what a state entering before step 0 is multiplied by at step t), both of that shape. Every
    factor exp(.) is at most 1, so nothing overflows.
    """
    step = 1
    while step < inputs.shape[dim]:
        # each position t holds the map from the state before t - step + 1 to h_t; compose it with the one before
        inputs = inputs + torch.exp(log_decay) * _shifted(inputs, step, dim)
        log_decay = log_decay + _shifted(log_decay, step, dim)
        step *= 2
    return inputs, log_decay


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor, delta_bias: torch.Tensor, z: torch.Tensor,
                             chunk_size: int, segment: int = SCAN_SEGMENT) -> torch.Tensor:
    """Mamba-1's selective scan as mamba-ssm's ``selective_scan_fn`` computes it (``delta_softplus=True``, with D
    and z), in PyTorch: for each channel k and state index i,

        dt_t = softplus(delta_t + delta_bias),  h_t[k, i] = exp(dt_t[k] A[k, i]) h_{t-1}[k, i] + dt_t[k] B_t[i] u_t[k],
        out_t[k] = (sum_i C_t[i] h_t[k, i] + D[k] u_t[k]) * silu(z_t[k]),

    from h_{-1} = 0, with B and C of channel k from its group k // (d / g).

    u, delta, z: (b, l, d); A: (d, n) negative rates; B, C: (b, l, g, n); D, delta_bias: (d,); chunk_size: T.
    Returns (b, l, d) in u.dtype, computed in at least float32.

    Every step of a segment of up to ``segment`` steps is computed at once (``scan_segment``, a few (b, segment, d,
    n) tensors at a time); longer sequences are scanned segment after segment, each starting from the state the one
    before left, so that memory stays bounded.
    """
    in_dtype, dtype = u.dtype, torch.promote_types(u.dtype, torch.float32)
    b, l, d = u.shape
    g, n = B.shape[-2:]
    u, delta, z, B, C = (t.to(dtype) for t in (u, delta, z, B, C))
    dt = F.softplus(delta + delta_bias.to(dtype))
    A = A.to(dtype).unflatten(0, (g, -1))  # (g, r, n): channels as (g, d / g), so that B and C broadcast over a group
    state = u.new_zeros(b, g, d // g, n)
    ys = []
    for start in range(0, l, segment):
        steps = slice(start, start + segment)
        y, state = scan_segment(dt[:, steps], u[:, steps], A, B[:, steps], C[:, steps], state, chunk_size)
        ys.append(y)
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
    return ((y + u * D.to(dtype)) * F.silu(z)).to(in_dtype)


def scan_segment(dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``selective_scan_reference``'s scan over one segment, from ``state``: dt (steps after softplus), u: (b, l, d);
    A: (g, r, n) with r = d / g; B, C: (b, l, g, n); state: (b, g, r, n), the state before the first step.
    Returns (y (b, l, d), without the D skip and the gate; the state after the last step (b, g, r, n)).

    Chunked: within each chunk of T steps every state is found at once from a zero start (``linear_scan``, log2 T
    steps over all chunks together); the states the chunks leave are then carried from chunk to chunk by the same
    scan over the c chunks, and the state entering a chunk (with ``state`` decayed through the chunks before)
    reaches its step t through the cumulative log-decay of the steps before (exp of a sum of log-decays, <= 1).
    Any l works (zero-padded to a multiple of T at the end, which no real step sees and which leaves the state as
    it is).
    """
    b, l, g, n = B.shape
    T, pad = chunk_size, -l % chunk_size
    c = (l + pad) // T
    log_decay = dt.unflatten(-1, (g, -1))[..., None] * A  # (b, l, g, r, n)
    inputs = (dt * u).unflatten(-1, (g, -1))[..., None] * B[:, :, :, None]  # (b, l, g, r, n)
    if pad:
        log_decay, inputs = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (log_decay, inputs))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    states, lead_in = linear_scan(log_decay.unflatten(1, (c, T)), inputs.unflatten(1, (c, T)), dim=2)
    # chunk k's end state from zero, and the log-decay through chunks 0..k: (b, c, g, r, n)
    carried, through = linear_scan(lead_in[:, :, -1], states[:, :, -1], dim=1)
    entering = _shifted(carried, 1, dim=1) + torch.exp(_shifted(through, 1, dim=1)) * state[:, None]
    states = states + torch.exp(lead_in) * entering[:, :, None]  # (b, c, T, g, r, n)
    y = torch.einsum("bctgrn,bctgn->bctgr", states, C.unflatten(1, (c, T))).reshape(b, c * T, -1)[:, :l]
    return y, carried[:, -1] + torch.exp(through[:, -1]) * state

# ---------------------------------------------------------------------------------------------- CUDA kernels
@functools.cache
def mamba_ssm_ssd_kernels():
    """mamba-ssm's SSD scan, forward and the kernels of its backward (the module ``ssd_combined``, which imports
    them all), or None when mamba-ssm does not import."""
    try:
        from mamba_ssm.ops.triton import ssd_combined
    except ImportError:
        return None
    return ssd_combined


@functools.cache
def scan2d_kernels():
    """Our Triton kernels of ``Scan2D`` (the module ``scan2d_kernels``), or None where triton does not import."""
    try:
        from lit_dimba.models import scan2d_kernels
    except ImportError:
        return None
    return scan2d_kernels


@functools.cache
def causal_conv1d_kernel():
    """causal-conv1d's ``causal_conv1d_fn``, or None when the package (with its CUDA extension) does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def _conv_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether causal-conv1d's kernel runs on x (b, l, d) read channel-last: it needs d and the batch and step
    strides to be multiples of 8 and a width of 2 to 4."""
    return (x.is_cuda and x.stride(2) == 1 and x.shape[2] % 8 == 0 and x.stride(0) % 8 == 0
            and x.stride(1) % 8 == 0 and 2 <= weight.shape[1] <= 4)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel=None) -> torch.Tensor:
    """SiLU of the causal depthwise conv of x (b, l, d) with weight (d, k), bias (d,) -> (b, l, d) in x.dtype.

    ``kernel``: causal-conv1d's ``causal_conv1d_fn`` (``causal_conv1d_kernel()``), used for CUDA inputs it takes
    (channel-last strides that are multiples of 8), eagerly and under ``torch.compile`` (causal-conv1d 1.7 registers
    its kernels as custom ops); otherwise the PyTorch form.
    """
    if kernel is not None and _conv_kernel_takes(x, weight):
        return kernel(x.transpose(1, 2), weight.to(x.dtype), bias.to(x.dtype), activation="silu").transpose(1, 2)
    return causal_conv1d_reference(x, weight, bias)


def causal_conv1d_silu_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, channels: int,
                               kernel=None) -> torch.Tensor:
    """x (b, l, w) -> (b, l, w): ``causal_conv1d_silu`` of the first ``channels`` columns, then the other columns as
    they are, concatenated. The result keeps x's width (Mamba-2's padded in_proj width), so the conv output's
    gradient, a view of the result's, has the row strides causal-conv1d's backward takes (multiples of 8)."""
    return torch.cat([causal_conv1d_silu(x[..., :channels], weight, bias, kernel), x[..., channels:]], dim=-1)


def scan_parts(xBCdt: torch.Tensor, nheads: int, headdim: int, d_state: int, ngroups: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan's inputs as views of one packed tensor, the conv's output as Mamba-2 lays it out: xBCdt (b, l, w)
    holds x (h * p columns), B and C (g * n each) and the raw steps dt (h), in that order, then any columns the scan
    does not read -> (x (b, l, h, p), dt (b, l, h), B (b, l, g, n), C (b, l, g, n))."""
    d_inner, gn = nheads * headdim, ngroups * d_state
    x, B, C, dt = xBCdt[..., : d_inner + 2 * gn + nheads].split([d_inner, gn, gn, nheads], dim=-1)
    return (x.unflatten(-1, (nheads, headdim)), dt, B.unflatten(-1, (ngroups, d_state)),
            C.unflatten(-1, (ngroups, d_state)))


def ssd_scan(xBCdt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, headdim: int,
             d_state: int, ngroups: int, chunk_size: int) -> torch.Tensor:
    """``ssd_reference`` on the views ``scan_parts(xBCdt, ...)`` (h = A's length) as one operator,
    ``lit_dimba::ssd_scan``: mamba-ssm's fused Triton kernels on CUDA, ``ssd_reference`` on a CPU -> y (b, l, h, p),
    contiguous. Taking the packed tensor, not its parts, lets the backward write the parts' gradients into one
    tensor of xBCdt's shape, the gradient the conv before it takes, where autograd would otherwise assemble it from
    four in a copy."""
    return torch.ops.lit_dimba.ssd_scan(xBCdt, A, D, dt_bias, headdim, d_state, ngroups, chunk_size)[0]


@torch.library.custom_op("lit_dimba::ssd_scan", mutates_args=())
def ssd_scan_op(xBCdt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, headdim: int,
                d_state: int, ngroups: int, chunk_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan's output y (b, l, h, p) and what its backward reuses, on CUDA from mamba-ssm's forward: the steps
    softplus(dt + dt_bias) and the cumulative sums of their decays within each chunk, (b, h, c, T) in float32, and
    the state entering each chunk, (b, c, h, p, n) in xBCdt's dtype; on a CPU those three are empty (its backward is
    the reference's vector-Jacobian product)."""
    x, dt, B, C = scan_parts(xBCdt, A.shape[0], headdim, d_state, ngroups)
    if not xBCdt.is_cuda:
        empty = xBCdt.new_empty(0)
        return ssd_reference(x, dt, A, B, C, D, dt_bias, chunk_size).contiguous(), empty, empty.clone(), empty.clone()
    ssd = _require_mamba_ssm(mamba_ssm_ssd_kernels(), "ssd_scan")
    y, _, steps, decay_sums, states, _ = ssd._mamba_chunk_scan_combined_fwd(x, dt, A, B, C, chunk_size, D=D,
                                                                            dt_bias=dt_bias, dt_softplus=True)
    return y.contiguous(), steps, decay_sums, states


@ssd_scan_op.register_fake
def _ssd_scan_fake(xBCdt, A, D, dt_bias, headdim, d_state, ngroups, chunk_size):
    b, l, _ = xBCdt.shape
    h = A.shape[0]
    y = xBCdt.new_empty(b, l, h, headdim)
    if xBCdt.device.type != "cuda":
        empty = xBCdt.new_empty(0)
        return y, empty, empty.clone(), empty.clone()
    c = -(-l // chunk_size)
    steps = xBCdt.new_empty(b, h, c, chunk_size, dtype=torch.float32)
    return y, steps, torch.empty_like(steps), xBCdt.new_empty(b, c, h, headdim, d_state)


@torch.library.custom_op("lit_dimba::ssd_scan_backward", mutates_args=())
def ssd_scan_backward(grad: torch.Tensor, xBCdt: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                      dt_bias: torch.Tensor, steps: torch.Tensor, decay_sums: torch.Tensor, states: torch.Tensor,
                      headdim: int, d_state: int, ngroups: int, chunk_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``ssd_scan`` for ``grad`` (b, l, h, p): (dxBCdt (b, l, w) contiguous, the parts' gradients where
    the parts lie and zeros in the columns the scan does not read; dA, dD, ddt_bias), each in its input's dtype. On
    CUDA, mamba-ssm's backward kernels given ``steps``, ``decay_sums`` and ``states`` from the forward
    (``ssd_scan_op``), writing dx, dB, dC and ddt into their views of dxBCdt; on a CPU, the vector-Jacobian product of
    ``ssd_reference``."""
    sizes = (A.shape[0], headdim, d_state, ngroups)
    if not xBCdt.is_cuda:
        def scan(packed, A, D, dt_bias):
            x, dt, B, C = scan_parts(packed, *sizes)
            return ssd_reference(x, dt, A, B, C, D, dt_bias, chunk_size)

        _, vjp = torch.func.vjp(scan, xBCdt, A, D, dt_bias)
        grads = vjp(grad)
    else:
        grads = _ssd_backward_kernels(grad, xBCdt, A, D, dt_bias, steps, decay_sums, states, sizes, chunk_size)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (xBCdt, A, D, dt_bias)))


@ssd_scan_backward.register_fake
def _ssd_scan_backward_fake(grad, xBCdt, A, D, dt_bias, steps, decay_sums, states, headdim, d_state, ngroups,
                            chunk_size):
    return tuple(t.new_empty(t.shape) for t in (xBCdt, A, D, dt_bias))


def _ssd_backward_kernels(grad, xBCdt, A, D, dt_bias, steps, decay_sums, states, sizes, chunk_size):
    """mamba-ssm's SSD backward kernels, in the order of its ``_mamba_chunk_scan_combined_bwd`` for this scan (no z,
    no initial or final states, no sequence index), but reusing the forward's ``steps``, ``decay_sums`` and
    ``states`` where mamba-ssm recomputes them (``_chunk_cumsum_fwd``, ``_chunk_state_fwd`` and
    ``_state_passing_fwd``: about a tenth of its backward's time), and writing dx, dB, dC and ddt into their views of
    one tensor shaped like xBCdt (as mamba-ssm's own fused Mamba-2 backward does for its input). The one difference
    in arithmetic: the chunk states enter the decays' gradient as the forward stored them (xBCdt's dtype), where
    mamba-ssm recomputes them in float32. ``sizes``: (h, p, n, g). -> (dxBCdt, dA, dD, ddt_bias)."""
    ssd = _require_mamba_ssm(mamba_ssm_ssd_kernels(), "ssd_scan")
    nheads, p, n, groups = sizes
    x, dt, B, C = scan_parts(xBCdt, *sizes)
    dxBCdt = torch.empty(xBCdt.shape, dtype=xBCdt.dtype, device=xBCdt.device)
    dxBCdt[..., nheads * p + 2 * groups * n + nheads:].zero_()  # the columns the scan does not read
    dx, ddt, dB, dC = scan_parts(dxBCdt, *sizes)
    CB = ssd._bmm_chunk_fwd(C, B, chunk_size, output_dtype=torch.float32)  # (b, c, g, T, T)
    dstates = ssd._chunk_scan_bwd_dstates(C, decay_sums, grad, dtype=torch.float32)  # (b, c, h, p, n)
    dstates, ddecay_last, _, states = ssd._state_passing_bwd(states.flatten(-2), decay_sums[..., -1],
                                                             dstates.flatten(-2), dstates_dtype=x.dtype,
                                                             states_dtype=x.dtype, chunk_size=chunk_size)
    dstates, states = dstates.unflatten(-1, (p, n)), states.unflatten(-1, (p, n))
    _, dsteps, dD = ssd._chunk_scan_chunk_state_bwd_dx(x, steps, decay_sums, B, CB, grad, dstates, D=D, dx=dx)
    dB_states, ddecay_next = ssd._chunk_state_bwd_db(x, steps, decay_sums, dstates, B=B, ngroups=groups)
    dC_states, ddecay_prev = ssd._chunk_scan_bwd_dC(states, decay_sums, grad, C=C, ngroups=groups)
    dCB = ssd._chunk_scan_bwd_dcb(x, steps, decay_sums, grad, ngroups=groups).to(CB.dtype)
    ssd._bmm_chunk_bwd(C, dCB, residual=dB_states, out=dB)
    ssd._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_states, out=dC)
    ddecay_prev[..., -1] += ddecay_last
    ddecay = (ssd._chunk_scan_bwd_ddAcs_stable(x, steps, decay_sums, grad, CB) + ddecay_next
              + ddecay_prev.flip(-1).cumsum(-1).flip(-1))  # (b, h, c, T)
    _, dA, ddt_bias = ssd._chunk_cumsum_bwd(ddecay, dsteps, dt, A, dt_bias=dt_bias, dt_softplus=True, ddt=ddt)
    return dxBCdt, dA, dD, ddt_bias


def _ssd_scan_setup_context(ctx, inputs, output):
    *tensors, ctx.headdim, ctx.d_state, ctx.ngroups, ctx.chunk_size = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*tensors, *output[1:])


def _ssd_scan_grad(ctx, grad, *_):
    return (*ssd_scan_backward(grad.contiguous(), *ctx.saved_tensors, ctx.headdim, ctx.d_state, ctx.ngroups,
                               ctx.chunk_size), None, None, None, None)


ssd_scan_op.register_autograd(_ssd_scan_grad, setup_context=_ssd_scan_setup_context)


@torch.library.custom_op("lit_dimba::gated_rms_norm_forward", mutates_args=())
def gated_rms_norm_forward(y: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                           group_size: int, eps: float) -> torch.Tensor:
    """``gated_rms_norm`` as one operator: (b * n, S, d) contiguous in y.dtype. CUDA: our Triton kernel
    (``scan2d_kernels``), which reads y's rows through ``rows`` in place; CPU: the reference on the gathered rows."""
    if not y.is_cuda:
        return gated_rms_norm_reference(_rows_of(y, rows), z, weight, group_size, eps).contiguous()
    return _require_triton("gated_rms_norm_forward").gated_rms_norm_rows(y, rows, z, weight, group_size, eps)


@gated_rms_norm_forward.register_fake
def _gated_rms_norm_forward_fake(y, rows, z, weight, group_size, eps):
    return y.new_empty(z.shape[0], rows.shape[1], y.shape[2])


@torch.library.custom_op("lit_dimba::gated_rms_norm_backward", mutates_args=())
def gated_rms_norm_backward(grad: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, z: torch.Tensor,
                            weight: torch.Tensor, group_size: int, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``gated_rms_norm`` for ``grad`` (b * n, S, d): (dy (b, m, d), dz, dweight) in their inputs'
    dtypes, dz and dweight summed over the S outputs, dy at y's rows. CUDA: our Triton kernel, which reads y's rows
    in place and writes dy there (``scan2d_kernels``); CPU: the vector-Jacobian product of the reference on the
    gathered rows, put back."""
    if y.is_cuda:
        return _require_triton("gated_rms_norm_backward").gated_rms_norm_rows_backward(
            grad, y, rows, z, weight, group_size, eps)
    _, vjp = torch.func.vjp(lambda *args: gated_rms_norm_reference(*args, group_size, eps), _rows_of(y, rows), z,
                            weight)
    dgathered, dz, dweight = vjp(grad)
    b, m, d = y.shape
    dy = y.new_empty(b, m, d).index_copy_(1, rows.flatten(), dgathered.view(b, m, d))
    return dy, dz.contiguous(), dweight


@gated_rms_norm_backward.register_fake
def _gated_rms_norm_backward_fake(grad, y, rows, z, weight, group_size, eps):
    return y.new_empty(y.shape), z.new_empty(z.shape), weight.new_empty(weight.shape)


def _gated_rms_norm_setup_context(ctx, inputs, output):
    y, rows, z, weight, ctx.group_size, ctx.eps = inputs
    ctx.save_for_backward(y, rows, z, weight)


def _gated_rms_norm_grad(ctx, grad):
    y, rows, z, weight = ctx.saved_tensors
    dy, dz, dweight = gated_rms_norm_backward(grad.contiguous(), y, rows, z, weight, ctx.group_size, ctx.eps)
    return dy, None, dz, dweight, None, None


gated_rms_norm_forward.register_autograd(_gated_rms_norm_grad, setup_context=_gated_rms_norm_setup_context)


def _rows_of(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """y (b, m, d), rows (n, S) -> (b * n, S, d): token t's S rows of y[b], in a new tensor."""
    return y.index_select(1, rows.flatten()).view(-1, *rows.shape[1:], y.shape[2])


def gated_rms_norm(y: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float, fused: bool) -> torch.Tensor:
    """rmsnorm(y_s * silu(z)) * weight for the S outputs y_s of each token that share its gate z, read from y's rows.

    y (b, m, d): outputs, one per row, in any order; rows (n, S) int64, a permutation of range(m) (m = n * S): token
    t's s-th output is y[b, rows[t, s]]; z (b * n, d) (rows may be strided); weight (d,) -> (b * n, S, d) in
    y.dtype. ``fused``: the custom op ``lit_dimba::gated_rms_norm_forward`` (our Triton kernel, which reads the rows
    in place); else a gather (``lit_dimba::gather_rows``) and ``gated_rms_norm_reference``, which torch.compile
    fuses itself.
    """
    if fused:
        return gated_rms_norm_forward(y, rows, z, weight, group_size, eps)
    order = rows.flatten()
    where = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    gathered = gather_rows(y, order, where[:, None]).view(z.shape[0], rows.shape[1], -1)
    return gated_rms_norm_reference(gathered, z, weight, group_size, eps)


@torch.library.custom_op("lit_dimba::gather_conv1d_silu", mutates_args=())
def gather_conv1d_silu(x: torch.Tensor, to_scan: torch.Tensor, to_rows: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, channels: int) -> torch.Tensor:
    """x's rows put into S sequences, the first ``channels`` columns of each through ``causal_conv1d_silu``.

    x (b, m, w) (rows may be strided), to_scan (S * m,) int64: the row of x at step t of sequence s is
    ``to_scan[s * m + t]``; to_rows (m, S): where each row went, ``to_scan``'s inverse (for the backward); weight
    (channels, k), bias (channels,) -> (b * S, m, w) contiguous in x.dtype: the conv's SiLU, then the other columns
    as they are. CUDA: our Triton kernel (``scan2d_kernels``), which reads each step's row where it lies, with no
    gathered copy; CPU: the unfused ``gathered_causal_conv1d_silu`` (a gather, then the PyTorch conv).
    """
    if not x.is_cuda:
        return gathered_causal_conv1d_silu(x, to_scan, to_rows, weight, bias, channels, False)
    return _require_triton("gather_conv1d_silu").gather_causal_conv1d_silu(x, to_scan, weight, bias, channels)


@gather_conv1d_silu.register_fake
def _gather_conv1d_silu_fake(x, to_scan, to_rows, weight, bias, channels):
    return x.new_empty(to_scan.shape[0] // x.shape[1] * x.shape[0], x.shape[1], x.shape[2])


@torch.library.custom_op("lit_dimba::gather_conv1d_silu_backward", mutates_args=())
def gather_conv1d_silu_backward(grad: torch.Tensor, x: torch.Tensor, to_scan: torch.Tensor, to_rows: torch.Tensor,
                                weight: torch.Tensor, bias: torch.Tensor, channels: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``gather_conv1d_silu`` for ``grad`` (b * S, m, w): (dx (b, m, w), dweight, dbias) in their inputs'
    dtypes, each row's gradient the sum over its S sequence steps. CUDA: our Triton kernels (``scan2d_kernels``),
    which read the rows where they lie and write each row's gradient once; CPU: the sequences gathered again, the
    vector-Jacobian product of the PyTorch form, and a gather of each row's S gradients (no atomic adds)."""
    if x.is_cuda:
        return _require_triton("gather_conv1d_silu_backward").gather_causal_conv1d_silu_backward(
            grad, x, to_scan, to_rows, weight, bias, channels)
    b, m, w = x.shape
    sequences = x.index_select(1, to_scan).view(-1, m, w)[..., :channels]
    _, vjp = torch.func.vjp(causal_conv1d_reference, sequences, weight, bias)
    dconv, dweight, dbias = vjp(grad[..., :channels])
    dsequences = torch.cat([dconv.to(grad.dtype), grad[..., channels:]], dim=-1).view(b, -1, w)
    dx = dsequences.index_select(1, to_rows.flatten()).view(b, m, -1, w).sum(2)
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias.to(bias.dtype)


@gather_conv1d_silu_backward.register_fake
def _gather_conv1d_silu_backward_fake(grad, x, to_scan, to_rows, weight, bias, channels):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _gather_conv1d_silu_setup_context(ctx, inputs, output):
    x, to_scan, to_rows, weight, bias, ctx.channels = inputs
    ctx.save_for_backward(x, to_scan, to_rows, weight, bias)


def _gather_conv1d_silu_grad(ctx, grad):
    x, to_scan, to_rows, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = gather_conv1d_silu_backward(grad.contiguous(), x, to_scan, to_rows, weight, bias,
                                                     ctx.channels)
    return dx, None, None, dweight, dbias, None


gather_conv1d_silu.register_autograd(_gather_conv1d_silu_grad, setup_context=_gather_conv1d_silu_setup_context)


def gathered_causal_conv1d_silu(x: torch.Tensor, to_scan: torch.Tensor, to_rows: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor, channels: int, fused: bool, kernel=None) -> torch.Tensor:
    """x's rows (b, m, w) put into S sequences by ``to_scan`` (S * m,) (``to_rows`` (m, S) its inverse) -> (b * S, m,
    w) in x.dtype: the SiLU of the causal depthwise conv of their first ``channels`` columns, then the other columns
    as they are. ``fused``: the custom op ``lit_dimba::gather_conv1d_silu`` (one Triton kernel on CUDA); else a gather
    (``gather_rows``), then ``causal_conv1d_silu_columns`` with ``kernel``."""
    if fused:
        return gather_conv1d_silu(x, to_scan, to_rows, weight, bias, channels)
    sequences = gather_rows(x, to_scan, to_rows).view(-1, *x.shape[1:])
    return causal_conv1d_silu_columns(sequences, weight, bias, channels, kernel)


@torch.library.custom_op("lit_dimba::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, index: torch.Tensor, uses: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (b, m, d), index (k,) -> x[:, index] (b, k, d), contiguous: ATen's ``index_select``, as one operator.

    ``uses`` (m, r): the positions in ``index`` where each row of x is taken (every row r times, as when the
    tokens are put into r scan orders); with it the gradient is a gather too, dx[:, i] = sum_j dout[:, uses[i, j]]:
    no atomic adds, so it is deterministic. Inside a compiled graph this stays one ATen gather; inductor's own
    lowering of the gather (an indirect load in a fused kernel) ran 20 to 50 times slower on an H200 (README).
    """
    return x.index_select(1, index)


@gather_rows.register_fake
def _gather_rows_fake(x, index, uses=None):
    return x.new_empty(x.shape[0], index.shape[0], x.shape[2])


def _gather_rows_setup_context(ctx, inputs, output):
    x, _, uses = inputs
    ctx.rows = x.shape[1]
    ctx.save_for_backward(uses)


def _gather_rows_grad(ctx, grad):
    (uses,) = ctx.saved_tensors
    if uses is None:
        raise RuntimeError("lit_dimba::gather_rows is differentiable only when given `uses`, the positions of each "
                           "row in `index`")
    b, _, d = grad.shape
    return gather_rows(grad.contiguous(), uses.flatten()).view(b, ctx.rows, uses.shape[1], d).sum(2), None, None


gather_rows.register_autograd(_gather_rows_grad, setup_context=_gather_rows_setup_context)


@functools.cache
def selective_scan_kernel():
    """mamba-ssm's ``selective_scan_fn``, or None unless its CUDA extension is built.

    mamba-ssm's ``ops.selective_scan_interface`` imports the extension module ``selective_scan_cuda`` when it is
    imported; an install without the compiled extension may still provide an importable stand-in module, which
    lacks the kernel entry point ``fwd``: that counts as not built.
    """
    try:
        import selective_scan_cuda
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn if callable(getattr(selective_scan_cuda, "fwd", None)) else None


@torch.compiler.disable
def selective_scan_mamba_ssm(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor, delta_bias: torch.Tensor, z: torch.Tensor
                             ) -> torch.Tensor:
    """``selective_scan_reference`` (same arguments but the chunk size, same result) by mamba-ssm's CUDA kernel,
    which takes channels before steps: u, delta, z as (b, d, l), B, C as (b, g, n, l), all in u's dtype; A, D and
    delta_bias in float32. It is an autograd function around a C++ extension, which ``torch.compile`` cannot trace:
    compiled code calls it eagerly (one graph break per call)."""
    dtype = u.dtype
    out = selective_scan_kernel()(
        u.transpose(1, 2), delta.to(dtype).transpose(1, 2), A.float(), B.to(dtype).permute(0, 2, 3, 1),
        C.to(dtype).permute(0, 2, 3, 1), D.float(), z=z.to(dtype).transpose(1, 2), delta_bias=delta_bias.float(),
        delta_softplus=True)
    return out.transpose(1, 2)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, delta_bias: torch.Tensor, z: torch.Tensor, chunk_size: int,
                   fused: bool) -> torch.Tensor:
    """Mamba-1's selective scan (see ``selective_scan_reference`` for the arguments): mamba-ssm's CUDA kernel when
    ``fused``, else the PyTorch form with chunks of ``chunk_size`` steps. (b, l, d) in u.dtype."""
    if fused:
        return selective_scan_mamba_ssm(u, delta, A, B, C, D, delta_bias, z)
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias, z, chunk_size)


def _require_triton(op: str):
    """``scan2d_kernels``, or a RuntimeError naming ``op`` and the way out."""
    kernels = scan2d_kernels()
    if kernels is None:
        raise RuntimeError(f"lit_dimba::{op} on CUDA runs a Triton kernel, but triton does not import; install it "
                           "or use Mamba2(kernel='torch')")
    return kernels


def _require_mamba_ssm(functions, op: str):
    if functions is None:
        raise RuntimeError(f"lit_dimba::{op} on CUDA runs mamba-ssm's Triton kernels, but mamba_ssm does not "
                           "import; install it (pip install -e '.[gpu]') or use Mamba2(kernel='torch')")
    return functions
