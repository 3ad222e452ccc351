import pytest
import torch
import torch.nn.functional as F

from lit_dimba.errors import ConfigError
from lit_dimba.models.mamba import Mamba2, Scan2D
from lit_dimba.models import mamba_ops
from lit_dimba.models.mamba_ops import causal_conv1d_reference, ssd_chunked, ssd_naive

SMALL = dict(d_state=8, headdim=8, chunk_size=4)  # d_model 16 -> d_inner 32, 4 heads


def random_ssd_inputs(b, l, h, p, g, n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype))
    A = -torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8, 32])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_ssd_chunked_matches_recurrence(chunk_size, ngroups):
    inputs = random_ssd_inputs(b=2, l=13, h=4, p=3, g=ngroups, n=5)
    y = ssd_chunked(*inputs, chunk_size=chunk_size)
    ref = ssd_naive(*inputs)
    assert y.shape == (2, 13, 4, 3) and y.dtype == torch.float64
    assert ((y - ref).norm() / ref.norm()).item() < 1e-10


def test_ssd_chunked_low_precision_inputs():
    inputs = random_ssd_inputs(b=1, l=10, h=2, p=4, g=1, n=4, dtype=torch.float32)
    ref = ssd_naive(*inputs)
    assert ((ssd_chunked(*inputs, chunk_size=4) - ref).norm() / ref.norm()).item() < 1e-5
    y = ssd_chunked(*(t.bfloat16() for t in inputs), chunk_size=4)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 3e-2


def reference_mamba2(m: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """Mamba-2 forward from the paper's recurrence, written independently of the module's code paths."""
    b, l, _ = x.shape
    d_inner, nheads, ngroups, n = m.d_inner, m.nheads, m.ngroups, m.d_state
    zxbcdt = x @ m.in_proj.weight.T
    z, xBC, dt = zxbcdt[..., :d_inner], zxbcdt[..., d_inner:-nheads], zxbcdt[..., -nheads:]
    k = m.conv1d.weight.shape[-1]
    xBC = F.conv1d(F.pad(xBC.transpose(1, 2), (k - 1, 0)), m.conv1d.weight, m.conv1d.bias, groups=xBC.shape[-1])
    xBC = F.silu(xBC.transpose(1, 2))
    xs = xBC[..., :d_inner].reshape(b, l, nheads, -1)
    B = xBC[..., d_inner:d_inner + ngroups * n].reshape(b, l, ngroups, n)
    C = xBC[..., d_inner + ngroups * n:].reshape(b, l, ngroups, n)
    dt = torch.log1p(torch.exp(dt + m.dt_bias))
    A = -torch.exp(m.A_log)
    heads = nheads // ngroups
    state = torch.zeros(b, nheads, xs.shape[-1], n, dtype=x.dtype)
    ys = []
    for t in range(l):
        Bt, Ct = B[:, t].repeat_interleave(heads, 1), C[:, t].repeat_interleave(heads, 1)
        state = torch.exp(dt[:, t] * A)[:, :, None, None] * state + torch.einsum(
            "bh,bhp,bhn->bhpn", dt[:, t], xs[:, t], Bt)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ct) + m.D[:, None] * xs[:, t])
    y = torch.stack(ys, 1).reshape(b, l, d_inner) * F.silu(z)
    groups = y.reshape(b, l, ngroups, -1)
    y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(b, l, d_inner)
    return (y * m.norm.weight) @ m.out_proj.weight.T


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_matches_reference(ngroups):
    torch.manual_seed(0)
    m = Mamba2(16, ngroups=ngroups, kernel="torch", **SMALL).double()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.D.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y = m(x)
    ref = reference_mamba2(m, x)
    assert y.shape == x.shape
    assert ((y - ref).norm() / ref.norm()).item() < 1e-10


def test_auto_kernel_runs_pytorch_for_cpu_inputs(monkeypatch):
    """'auto' never calls the CUDA kernels' ops for a CPU input, even where mamba-ssm would import."""
    m = Mamba2(16, kernel="auto", **SMALL)
    m._has_mamba_ssm = True  # as if mamba-ssm were installed
    assert not m.fused(torch.randn(1, 7, 16))
    monkeypatch.setattr("lit_dimba.models.mamba.ssd_scan", lambda *args: 1 / 0)
    assert m(torch.randn(1, 7, 16)).shape == (1, 7, 16)


def test_backward_gives_finite_nonzero_grads():
    torch.manual_seed(0)
    m = Mamba2(16, kernel="torch", **SMALL)
    m(torch.randn(2, 10, 16)).square().mean().backward()
    for name, param in m.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


class ChannelLastConv(torch.autograd.Function):
    """causal-conv1d's conv with SiLU as its CUDA kernel checks its arguments: x and the output's gradient dout, (b,
    d, l) read channel-last, must have batch and step strides that are multiples of 8."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        assert x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0, x.stride()
        ctx.save_for_backward(x, weight, bias)
        return causal_conv1d_reference(x.transpose(1, 2), weight, bias).transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        if dout.stride(1) == 1 and (dout.stride(0) % 8 or dout.stride(2) % 8):
            raise RuntimeError(f"causal_conv1d with channel last layout requires strides (dout.stride(0) and "
                               f"dout.stride(2)) to be multiples of 8, got {dout.stride()}")
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
            out = causal_conv1d_reference(x.transpose(1, 2), weight, bias).transpose(1, 2)
            return torch.autograd.grad(out, (x, weight, bias), dout)


def test_mamba2_conv_gradient_has_the_strides_causal_conv1d_takes(monkeypatch):
    """With causal-conv1d's kernel (here a CPU stand-in that checks strides as the CUDA kernel does), the conv's output
    gradient reaches its backward with row strides that are multiples of 8, although conv_dim + nheads (52) is not
    one; outputs and gradients equal the PyTorch conv's. (mamba-ssm's check failed this way on an H200 when the conv's
    output was concatenated with dt alone.)"""
    monkeypatch.setattr(mamba_ops, "_conv_kernel_takes",
                        lambda x, weight: x.stride(2) == 1 and x.shape[2] % 8 == 0 and x.stride(0) % 8 == 0
                        and x.stride(1) % 8 == 0)
    torch.manual_seed(0)
    ours = Mamba2(16, kernel="torch", **SMALL).double()
    with_kernel = Mamba2(16, kernel="torch", **SMALL).double()
    with_kernel.load_state_dict(ours.state_dict())
    with_kernel._conv_kernel = lambda x, weight, bias, activation: ChannelLastConv.apply(x, weight, bias)
    assert (ours.conv_dim + ours.nheads) % 8
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    outputs = [m(x) for m in (ours, with_kernel)]
    torch.testing.assert_close(outputs[1], outputs[0])
    weights = torch.randn_like(x)
    for a, b in zip(*(torch.autograd.grad((out * weights).sum(), m.parameters())
                      for out, m in zip(outputs, (ours, with_kernel)))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("d_model,d_state,headdim,expand,ngroups,d_conv",
                         [(16, 8, 8, 2, 1, 4), (24, 6, 12, 2, 2, 4), (32, 16, 16, 3, 3, 3)])
def test_state_dict_matches_mamba_ssm_layout(d_model, d_state, headdim, expand, ngroups, d_conv):
    m = Mamba2(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups)
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    expected = {
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d.weight": (conv_dim, 1, d_conv),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert all(getattr(getattr(m, k), "_no_weight_decay", False) for k in ("dt_bias", "A_log", "D"))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(20, headdim=16)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(16, headdim=8, ngroups=3)


def test_mamba2_is_causal():
    torch.manual_seed(0)
    m = Mamba2(16, kernel="torch", **SMALL).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] += torch.randn(1, 6, 16, dtype=torch.float64)
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6], rtol=0, atol=1e-12)
    assert (y[:, 6:] - y2[:, 6:]).abs().amax() > 1e-3


def test_init_ranges_and_reinit():
    m = Mamba2(64, headdim=4, dt_min=0.002, dt_max=0.05, A_init_range=(2, 8), d_state=4)  # 32 heads
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    A = torch.exp(m.A_log)
    assert A.min() >= 2 - 1e-5 and A.max() <= 8 + 1e-5
    assert torch.equal(m.D, torch.ones(32))
    with torch.no_grad():
        for p in (m.dt_bias, m.A_log, m.D):
            p.zero_()
    m.init_ssm_parameters()
    assert F.softplus(m.dt_bias).min() >= 0.002 * (1 - 1e-5) and torch.exp(m.A_log).min() >= 2 - 1e-5
    assert torch.equal(m.D, torch.ones(32))


def test_kernel_choice_errors():
    with pytest.raises(ValueError, match="'mamba_ssm'") as info:
        Mamba2(16, kernel="triton", **SMALL)
    assert "'auto'" in str(info.value) and "'torch'" in str(info.value)
    m = Mamba2(16, kernel="mamba_ssm", **SMALL)
    with pytest.raises(ConfigError, match="needs a CUDA input.*kernel='torch'"):
        m(torch.randn(1, 4, 16))


def test_scan2d_non_square_shapes():
    scan = Scan2D(16, "h", kernel="torch", **SMALL)
    y = scan(torch.randn(2, 15, 16), (3, 5))
    assert y.shape == (2, 15, 16)
    with pytest.raises(ValueError, match="3x4 has 12 tokens but the input has 15"):
        scan(torch.randn(2, 15, 16), (3, 4))
    with pytest.raises(ValueError, match="scan order"):
        Scan2D(16, "d")


def receptive_field(scan, token, grid):
    """Which tokens the output at ``token`` depends on (row-major indices), from the gradient."""
    x = torch.randn(1, grid[0] * grid[1], 16, dtype=torch.float64, requires_grad=True)
    scan(x, grid)[0, token].sum().backward()
    return x.grad[0].abs().sum(-1) > 0


def test_scan2d_bidirectional_sees_both_sides():
    torch.manual_seed(0)
    seen = receptive_field(Scan2D(16, "w", kernel="torch", **SMALL).double(), 7, (3, 5))
    assert seen.all()
    seen = receptive_field(Scan2D(16, "w", bidirectional=False, kernel="torch", **SMALL).double(), 7, (3, 5))
    assert seen[:8].all() and not seen[8:].any()


def test_scan2d_orders():
    torch.manual_seed(0)
    w = Scan2D(16, "w", kernel="torch", **SMALL).double()
    h = Scan2D(16, "h", kernel="torch", **SMALL).double()
    h.load_state_dict(w.state_dict())
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    assert (w(x, (3, 4)) - h(x, (3, 4))).abs().amax() > 1e-3
    # "h" is "w" on the transposed grid: the unidirectional "h" output at (i, j) sees exactly the tokens of
    # the columns before j and the rows up to i of column j.
    x_t = x.view(2, 3, 4, 16).transpose(1, 2).reshape(2, 12, 16)
    y_t = w(x_t, (4, 3)).view(2, 4, 3, 16).transpose(1, 2).reshape(2, 12, 16)
    torch.testing.assert_close(h(x, (3, 4)), y_t, rtol=0, atol=1e-12)
    uni = Scan2D(16, "h", bidirectional=False, kernel="torch", **SMALL).double()
    seen = receptive_field(uni, 1 * 4 + 2, (3, 4)).view(3, 4)  # token at row 1, column 2
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[:, :2] = True
    expected[:2, 2] = True
    assert torch.equal(seen, expected)


def test_scan2d_unidirectional_has_no_fuse():
    uni = Scan2D(16, "w", bidirectional=False, **SMALL)
    assert not hasattr(uni, "fuse")
    assert all(k.startswith("mamba.") for k in uni.state_dict())
    bi = Scan2D(16, "w", **SMALL)
    assert bi.fuse.weight.shape == (16, 32)


def test_scan2d_directions_share_one_call(monkeypatch):
    """in_proj runs once on the B image sequences; conv and scan once on the 2B scan sequences."""
    scan = Scan2D(16, "h", kernel="torch", **SMALL)
    calls = []
    for name in ("in_projection", "scan"):
        method = getattr(scan.mamba, name)
        monkeypatch.setattr(scan.mamba, name, lambda x, *rest, name=name, method=method:
                            calls.append((name, x.shape[0])) or method(x, *rest))
    scan(torch.randn(3, 8, 16), (2, 4))
    assert calls == [("in_projection", 3), ("scan", 6)]


def scan2d_by_definition(scan: Scan2D, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Scan2D as first written: the grid transposed for "h", Mamba2 on the sequence and on its flip, the flip
    undone, ``fuse`` over [forward, backward], the transpose undone."""
    B, N, C = x.shape
    h, w = grid
    if scan.order == "h":
        x = x.view(B, h, w, C).transpose(1, 2).reshape(B, N, C)
    if scan.bidirectional:
        y = scan.fuse(torch.cat([scan.mamba(x), scan.mamba(x.flip(1)).flip(1)], dim=-1))
    else:
        y = scan.mamba(x)
    if scan.order == "h":
        y = y.view(B, w, h, C).transpose(1, 2).reshape(B, N, C)
    return y


@pytest.mark.parametrize("order", ["h", "w"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("batch", [2, 3])  # 30 tokens <= d_inner 32: out_proj then fuse; 45 > 32: one folded GEMM
def test_scan2d_equals_its_definition(order, bidirectional, batch):
    torch.manual_seed(0)
    scan = Scan2D(16, order, bidirectional=bidirectional, kernel="torch", **SMALL).double()
    with torch.no_grad():
        scan.mamba.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(batch, 15, 16, dtype=torch.float64)
    torch.testing.assert_close(scan(x, (3, 5)), scan2d_by_definition(scan, x, (3, 5)), rtol=1e-10, atol=1e-12)
    # Gradients agree too, through the gathers and the folded weights.
    grads = [torch.autograd.grad(f(scan, x, (3, 5)).square().sum(), list(scan.parameters()))
             for f in (Scan2D.__call__, scan2d_by_definition)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("batch", [2, 3])  # 30 tokens: out_proj then fuse unless frozen; 45: folded either way
def test_scan2d_frozen_equals_unfrozen_and_refreshes_in_place(batch):
    """``freeze`` derives the padded in_proj weight and the folded projection once; the frozen forward equals the
    plain one, and a later ``freeze`` takes changed parameters into the same tensors (what a CUDA graph reads)."""
    torch.manual_seed(0)
    scan = Scan2D(16, "h", kernel="torch", **SMALL).double()
    x = torch.randn(batch, 15, 16, dtype=torch.float64)
    expected = scan(x, (3, 5))
    scan.freeze(torch.float64)
    torch.testing.assert_close(scan(x, (3, 5)), expected, rtol=1e-10, atol=1e-12)
    kept = scan._in_weight.data_ptr(), scan._folded.data_ptr()
    scan.frozen = False
    with torch.no_grad():
        for param in scan.parameters():
            param.add_(0.1 * torch.randn_like(param))
    changed = scan(x, (3, 5))
    assert not torch.allclose(changed, expected)
    scan.freeze(torch.float64)
    torch.testing.assert_close(scan(x, (3, 5)), changed, rtol=1e-10, atol=1e-12)
    assert (scan._in_weight.data_ptr(), scan._folded.data_ptr()) == kept
