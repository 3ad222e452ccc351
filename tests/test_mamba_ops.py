"""The Mamba-2 operators: the PyTorch conv against nn.Conv1d, and the custom ops ``lit_dimba::ssd_scan`` and
``lit_dimba::gated_rms_norm_forward`` (on a CPU their kernels are the PyTorch references): schema, fake and autograd
registrations, gradients, and tracing by torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_dimba.models.mamba_ops import (causal_conv1d_reference, causal_conv1d_silu, gated_rms_norm, gather_rows,
                                        ssd_reference, ssd_scan)


def scan_inputs(dtype=torch.float64, b=2, l=11, h=4, p=3, g=2, n=5, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(x=torch.randn(b, l, h, p, generator=gen), dt=torch.randn(b, l, h, generator=gen),
                   A=-torch.rand(h, generator=gen) * 2 - 0.1, B=torch.randn(b, l, g, n, generator=gen),
                   C=torch.randn(b, l, g, n, generator=gen), D=torch.rand(h, generator=gen) + 0.5,
                   dt_bias=torch.randn(h, generator=gen) * 0.1)
    return {k: v.to(dtype).requires_grad_(requires_grad) for k, v in tensors.items()}


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
    inputs = scan_inputs(requires_grad=True)
    weights = torch.randn(2, 11, 4, 3, dtype=torch.float64)
    grads = [torch.autograd.grad((f(**inputs, chunk_size=4) * weights).sum(), list(inputs.values()))
             for f in (ssd_scan, ssd_reference)]
    for name, a, b in zip(inputs, *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_ssd_scan_op_is_one_graph_under_compile():
    """torch.compile traces through the op (fullgraph: a graph break would raise), forward and backward."""
    inputs = scan_inputs(torch.float32, requires_grad=True)

    def loss(x, dt, A, B, C, D, dt_bias):
        return ssd_scan(F.silu(x), dt, A, B, C, D, dt_bias, 4).square().sum()

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


@pytest.mark.parametrize("fused", [False, True])
def test_gated_rms_norm(fused):
    """rmsnorm(y_s * silu(z)) * weight per group of channels, for two outputs y_s sharing a strided gate z; the op's
    registrations (opcheck) and its gradients, which sum over the outputs for z and weight."""
    gen = torch.Generator().manual_seed(0)
    r, S, d, group = 5, 2, 8, 4
    y = torch.randn(r, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    zxbc = torch.randn(r, d + 3, generator=gen, dtype=torch.float64)
    z = zxbc[:, :d].requires_grad_()  # rows strided, as the gate's slice of in_proj's output
    weight = (torch.rand(d, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    got = gated_rms_norm(y, z, weight, group, 1e-5, fused)
    for s in range(S):
        u = (y[:, s] * z * torch.sigmoid(z)).view(r, d // group, group)
        expected = (u / (u.square().mean(-1, keepdim=True) + 1e-5).sqrt()).view(r, d) * weight
        torch.testing.assert_close(got[:, s], expected)
    if fused:
        torch.library.opcheck(torch.ops.lit_dimba.gated_rms_norm_forward.default, (y, z, weight, group, 1e-5))
    grads = torch.autograd.grad((got * torch.randn(got.shape, generator=gen, dtype=got.dtype)).sum(), (y, z, weight))
    for grad, tensor in zip(grads, (y, z, weight)):
        assert grad.shape == tensor.shape and grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda *a: gated_rms_norm(*a, group, 1e-5, fused), (y, z, weight))
