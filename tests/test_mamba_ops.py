"""The Mamba-2 operators: the PyTorch conv against nn.Conv1d, and the custom ops ``lit_dimba::ssd_scan``,
``lit_dimba::gated_rms_norm_forward`` and ``lit_dimba::gather_conv1d_silu`` (on a CPU their kernels are the PyTorch
references): schema, fake and autograd registrations, gradients, and tracing by torch.compile; Scan2D's Triton kernels
(the conv and the gated norm, forward and backward) in Triton's interpreter and compiled to sm_90 binaries."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_dimba.models.mamba import scan_gathers, scan_orders
from lit_dimba.models.mamba_ops import (causal_conv1d_reference, causal_conv1d_silu, gated_rms_norm,
                                        gathered_causal_conv1d_silu, gather_rows, scan_parts, ssd_reference,
                                        ssd_scan)
from tests.conftest import ROOT


def scan_inputs(dtype=torch.float64, b=2, l=11, h=4, p=3, g=2, n=5, seed=0, requires_grad=False):
    """The scan's inputs as ``ssd_scan`` takes them: x, B, C and dt packed in xBCdt (b, l, w) as the conv gives them,
    here with two columns after them that the scan does not read and strided rows (a slice of a wider tensor); A, D
    and dt_bias; the sizes."""
    gen = torch.Generator().manual_seed(seed)
    xBCdt = torch.randn(b, l, h * p + 2 * g * n + h + 2 + 3, generator=gen)[..., 3:]
    tensors = dict(xBCdt=xBCdt, A=-torch.rand(h, generator=gen) * 2 - 0.1, D=torch.rand(h, generator=gen) + 0.5,
                   dt_bias=torch.randn(h, generator=gen) * 0.1)
    return {**{k: v.to(dtype).requires_grad_(requires_grad) for k, v in tensors.items()}, "headdim": p, "d_state": n,
            "ngroups": g}


def reference_scan(xBCdt, A, D, dt_bias, headdim, d_state, ngroups, chunk_size):
    """``ssd_reference`` on the parts of xBCdt."""
    x, dt, B, C = scan_parts(xBCdt, A.shape[0], headdim, d_state, ngroups)
    return ssd_reference(x, dt, A, B, C, D, dt_bias, chunk_size)


@pytest.mark.parametrize("width", [2, 4])
def test_conv_reference_equals_nn_conv1d(width):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, width, groups=6, padding=width - 1).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    expected = F.silu(conv(x.transpose(1, 2))[..., :9]).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d_reference(x, conv.weight[:, 0], conv.bias), expected)
    # On a CPU a kernel changes nothing: causal-conv1d runs on CUDA only.
    torch.testing.assert_close(causal_conv1d_silu(x, conv.weight[:, 0], conv.bias, kernel=lambda *a, **k: 1 / 0),
                               expected)


def test_ssd_scan_op_registrations():
    """Schema, fake (shape) implementation and autograd registration, as torch.library checks them."""
    torch.library.opcheck(torch.ops.lit_dimba.ssd_scan.default, (), {**scan_inputs(requires_grad=True), "chunk_size": 4})
    torch.library.opcheck(torch.ops.lit_dimba.ssd_scan.default, (), {**scan_inputs(torch.float32), "chunk_size": 8})


def test_ssd_scan_op_gradients_equal_the_reference():
    """The op's gradients equal those of ``ssd_reference`` on the packed tensor's parts: the parts' gradients where
    the parts lie in one tensor, zeros in the columns the scan does not read."""
    inputs = scan_inputs(requires_grad=True)
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    weights = torch.randn(2, 11, 4, 3, dtype=torch.float64)
    grads = [torch.autograd.grad((f(**inputs, chunk_size=4) * weights).sum(), tensors)
             for f in (ssd_scan, reference_scan)]
    for name, a, b in zip(inputs, *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert grads[0][0].shape == inputs["xBCdt"].shape and grads[0][0].is_contiguous()
    assert grads[0][0][..., -2:].abs().max() == 0 and grads[0][0][..., :-2].abs().min() > 0


def test_ssd_scan_op_is_one_graph_under_compile():
    """torch.compile traces through the op (fullgraph: a graph break would raise), forward and backward."""
    inputs = scan_inputs(torch.float32, requires_grad=True)
    sizes = {k: inputs.pop(k) for k in ("headdim", "d_state", "ngroups")}

    def loss(xBCdt, A, D, dt_bias):
        return ssd_scan(F.silu(xBCdt), A, D, dt_bias, **sizes, chunk_size=4).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(loss(**inputs), list(inputs.values()))
    got = torch.autograd.grad(compiled(**inputs), list(inputs.values()))
    for name, a, b in zip(inputs, got, expected):
        torch.testing.assert_close(a, b, msg=name)


def test_gather_rows_op():
    """A gather along dim 1 whose gradient is a gather too (each row taken twice, as for two scan directions)."""
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 2, 0, 1, 3, 3, 1, 0, 2, 4])
    uses = torch.stack([index[:5].argsort(), index[5:].argsort() + 5], dim=1)  # (5, 2): where row i went
    torch.library.opcheck(torch.ops.lit_dimba.gather_rows.default, (x, index, uses))
    weights = torch.randn(2, 10, 3, dtype=torch.float64)
    got = torch.autograd.grad((gather_rows(x, index, uses) * weights).sum(), x)[0]
    expected = torch.autograd.grad((x[:, index] * weights).sum(), x)[0]
    torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError, match="differentiable only when given `uses`"):
        gather_rows(x, index).sum().backward()


def conv_inputs(dtype=torch.float64, b=2, grid=(3, 4), w=7, channels=5, k=4, bidirectional=True):
    """Rows x (b, h * w, w) with strided rows (a slice of a wider in_proj output), the maps of a (bidirectional)
    height-first scan, and conv weight (channels, k) and bias."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, grid[0] * grid[1], w + 3, generator=gen, dtype=dtype)[..., 3:]
    to_scan, to_rows = scan_gathers(scan_orders(grid, "h", bidirectional, torch.device("cpu")))
    return x, to_scan, to_rows, torch.randn(channels, k, generator=gen, dtype=dtype), torch.randn(channels,
                                                                                                   generator=gen,
                                                                                                   dtype=dtype)


def expected_conv(x, to_scan, weight, bias):
    """The sequences x[:, to_scan] one by one through nn.Conv1d's causal conv and SiLU, the other columns as they
    are: (b * S, m, w)."""
    channels, k = weight.shape
    sequences = x[:, to_scan].reshape(-1, x.shape[1], x.shape[2])
    conv = F.conv1d(sequences[..., :channels].transpose(1, 2), weight[:, None], bias, padding=k - 1, groups=channels)
    return torch.cat([F.silu(conv[..., : x.shape[1]]).transpose(1, 2), sequences[..., channels:]], dim=-1)


@pytest.mark.parametrize("fused", [False, True])
def test_gathered_conv(fused):
    """The conv along the scan sequences of strided rows, the op's registrations and its gradients (each row's the
    sum over the sequences it is in)."""
    x, to_scan, to_rows, weight, bias = conv_inputs()
    channels = weight.shape[0]
    if fused:
        torch.library.opcheck(torch.ops.lit_dimba.gather_conv1d_silu.default,
                              (x.requires_grad_(), to_scan, to_rows, weight.requires_grad_(), bias, channels))
    torch.testing.assert_close(gathered_causal_conv1d_silu(x, to_scan, to_rows, weight, bias, channels, fused),
                               expected_conv(x, to_scan, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, weight, bias: gathered_causal_conv1d_silu(x, to_scan, to_rows, weight, bias, channels, fused),
        (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))


def norm_inputs(dtype=torch.float64, b=2, n=5, S=2, d=8):
    """Scan outputs y (b, n * S, d) in a shuffled order, the row index of each token's S outputs (n, S), a gate z
    (b * n, d) with strided rows (the gate's slice of in_proj's output) and a weight (d,)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(b, n * S, d, generator=gen, dtype=dtype)
    rows = torch.randperm(n * S, generator=gen).view(n, S)
    z = torch.randn(b * n, d + 3, generator=gen, dtype=dtype)[:, :d]
    weight = torch.rand(d, generator=gen, dtype=dtype) + 0.5
    return y, rows, z, weight


def expected_norm(y, rows, z, weight, group):
    """rmsnorm(y_s * silu(z)) * weight per token and output s, written out: (b * n, S, d)."""
    b, _, d = y.shape
    n, S = rows.shape
    u = (y[:, rows].reshape(b * n, S, d) * (z * torch.sigmoid(z))[:, None]).view(b * n, S, d // group, group)
    rstd = 1 / (u.square().mean(-1) + 1e-5).sqrt()
    return (u * rstd[..., None]).view(b * n, S, d) * weight


@pytest.mark.parametrize("fused", [False, True])
def test_gated_rms_norm(fused):
    """rmsnorm(y_s * silu(z)) * weight per group of channels, for the two outputs y_s of each token, read through a
    row index and sharing a strided gate z; the op's registrations (opcheck) and its gradients, which sum over the
    outputs for z and weight and go back to y's rows."""
    group = 4
    y, rows, z, weight = (t.requires_grad_(t.is_floating_point()) for t in norm_inputs())
    got = gated_rms_norm(y, rows, z, weight, group, 1e-5, fused)
    torch.testing.assert_close(got, expected_norm(y, rows, z, weight, group))
    if fused:
        torch.library.opcheck(torch.ops.lit_dimba.gated_rms_norm_forward.default, (y, rows, z, weight, group, 1e-5))
    assert torch.autograd.gradcheck(lambda y, z, weight: gated_rms_norm(y, rows, z, weight, group, 1e-5, fused),
                                    (y, z, weight))


def check_triton_kernels():
    """The Triton kernels of ``Scan2D`` on CPU tensors against ``expected_conv`` and ``expected_norm`` and, for the
    backwards, their autograd gradients (run where TRITON_INTERPRET=1 was set before triton was first
    imported); the norm's backward once with one token per program, once with several (its dweight partial sums
    carried over a program's tokens, the last program's partly past the end)."""
    from lit_dimba.models import scan2d_kernels
    from lit_dimba.models.scan2d_kernels import (gated_rms_norm_rows, gated_rms_norm_rows_backward,
                                                 gather_causal_conv1d_silu, gather_causal_conv1d_silu_backward)

    # 9 x 8 = 72 steps: three blocks of 32 steps (two of 64 in the backward's second pass) and, with 140 columns, two
    # of 128 columns (three of 64).
    for bidirectional in (True, False):
        x, to_scan, to_rows, conv_weight, conv_bias = conv_inputs(torch.float32, grid=(9, 8), w=140, channels=130,
                                                                  bidirectional=bidirectional)
        expected = expected_conv(x, to_scan, conv_weight, conv_bias)
        got = gather_causal_conv1d_silu(x, to_scan, conv_weight, conv_bias, 130)
        torch.testing.assert_close(got, expected)
        grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
        got = gather_causal_conv1d_silu_backward(grad, x, to_scan, to_rows, conv_weight, conv_bias, 130)
        # the reference gradients in float64 from the same values: dbias sums 288 steps, and a float32 reference's
        # own rounding there comes near the float32 tolerance
        inputs = [t.double().requires_grad_() for t in (x, conv_weight, conv_bias)]
        expected_grads = torch.autograd.grad(expected_conv(inputs[0], to_scan, *inputs[1:]), inputs, grad.double())
        for name, a, b in zip(("dx", "dweight", "dbias"), got, expected_grads):
            torch.testing.assert_close(a, b.float(), msg=f"{name}, bidirectional={bidirectional}")

    for S in (2, 1):  # Scan2D's two outputs per token; Mamba2's one
        y, rows, z, weight = norm_inputs(torch.float32, S=S, d=12)
        group = 6
        y.requires_grad_(), z.requires_grad_(), weight.requires_grad_()
        expected = expected_norm(y, rows, z, weight, group)
        torch.testing.assert_close(gated_rms_norm_rows(y.detach(), rows, z.detach(), weight.detach(), group, 1e-5),
                                   expected.detach())
        grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
        expected_grads = torch.autograd.grad(expected, (y, z, weight), grad)
        for programs in (1024, 3):  # 10 tokens: one per program; 4 per program, the third program with 2
            scan2d_kernels.NORM_BACKWARD_PROGRAMS = programs
            got = gated_rms_norm_rows_backward(grad, y.detach(), rows, z.detach(), weight.detach(), group, 1e-5)
            for name, a, b in zip(("dy", "dz", "dweight"), got, expected_grads):
                torch.testing.assert_close(a, b, msg=f"{name}, S={S}, at most {programs} programs")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scan2d_triton_kernels_compile_for_hopper(dtype):
    """Each Triton kernel of ``Scan2D`` compiles to an sm_90 binary (H100/H200) with this machine's Triton and no GPU,
    its arguments specialised as a t2md run specialises them (pointers and sizes divisible by 16), at t2md's widths.
    The interpreter test runs the kernels' arithmetic but not the compiler, which can refuse what the interpreter
    accepts (a kernel once failed on the GPU machine's Triton 3.6 in a layout pass)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lit_dimba.models import scan2d_kernels

    norm = scan2d_kernels._norm_tile(2, 2304)  # t2md's tile: 2 scan directions, d_inner
    norm_constexprs = dict(S=2, S_BLOCK=norm["S_BLOCK"], GROUP=2304, BLOCK=norm["BLOCK"])
    settings = {  # kernel: (constexprs, warps)
        scan2d_kernels._gather_causal_conv1d_silu: (dict(S=2, K=4, BLOCK_L=scan2d_kernels.BLOCK_L,
                                                         BLOCK_D=scan2d_kernels.BLOCK_D), scan2d_kernels.WARPS),
        scan2d_kernels._conv_silu_grad: (dict(S=2, K=4, BLOCK_L=scan2d_kernels.BLOCK_L, BLOCK_D=scan2d_kernels.BLOCK_D),
                                         scan2d_kernels.WARPS),
        scan2d_kernels._conv_rows_grad: (dict(S=2, K=4, BLOCK_L=scan2d_kernels.ROWS_BLOCK_L,
                                              BLOCK_D=scan2d_kernels.ROWS_BLOCK_D),
                                         scan2d_kernels.ROWS_WARPS),
        scan2d_kernels._gated_rms_norm_rows: (norm_constexprs, norm["num_warps"]),
        scan2d_kernels._gated_rms_norm_rows_backward: (norm_constexprs, norm["num_warps"]),
    }
    for kernel, (constexprs, warps) in settings.items():
        signature = {name: "constexpr" if name in constexprs else "fp32" if name == "eps" else
                     "*i64" if name in ("ROWS", "INDEX") else "*fp32" if name == "PARTIAL" else
                     f"*{dtype}" if name.isupper() else "i32"
                     for name in kernel.arg_names}
        divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                     if name not in constexprs and name not in ("eps", "per_program")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=divisible)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.asm["cubin"], kernel.__name__


def test_scan2d_triton_kernels_in_the_interpreter():
    """The CUDA kernels, run by Triton's interpreter on the CPU (in a process of its own: the variable must be set
    before triton's own jit functions are built). The conv: two batch elements' strided rows along a bidirectional
    height-first scan, over more than one block of steps and of columns, forward and backward. The norm, forward and
    backward: the outputs of two batch elements read through the row index against a strided gate."""
    pytest.importorskip("triton")
    check = "from tests.test_mamba_ops import check_triton_kernels; check_triton_kernels()"
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, check=True)
