"""Mamba-1 (the released Dimba's mixer): the chunked PyTorch selective scan against the step-by-step recurrence in
float64, the bidirectional layer against its two branches computed one by one, and the CUDA kernel's call
(mamba-ssm's layout) and detection."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lit_dimba.errors import ConfigError
from lit_dimba.models import mamba_ops
from lit_dimba.models.mamba1 import BiMamba
from lit_dimba.models.mamba_ops import selective_scan_mamba_ssm, selective_scan_reference


def recurrence(u, delta, A, B, C, D, z, delta_bias):
    """mamba-ssm's selective scan, one step at a time, in its own layout: u, delta, z (b, d, l); A (d, n);
    B, C (b, g, n, l); D, delta_bias (d,). h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t,
    out = y * silu(z) with dt = softplus(delta + delta_bias)."""
    b, d, l = u.shape
    g = B.shape[1]
    dt = F.softplus(delta + delta_bias[:, None])
    B, C = B.repeat_interleave(d // g, dim=1), C.repeat_interleave(d // g, dim=1)  # (b, d, n, l)
    state = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        state = torch.exp(dt[:, :, t, None] * A) * state + (dt[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((state * C[..., t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1) * F.silu(z)


def scan_inputs(b=2, l=13, d=6, n=5, g=2, dtype=torch.float64, seed=0):
    """Random inputs in our layout ((b, l, d), B and C (b, l, g, n)), strong decays included."""
    gen = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(b, l, d, generator=gen, dtype=dtype) for _ in range(3))
    A = -torch.rand(d, n, generator=gen, dtype=dtype) * 8 - 0.05
    B, C = (torch.randn(b, l, g, n, generator=gen, dtype=dtype) for _ in range(2))
    D, delta_bias = (torch.randn(d, generator=gen, dtype=dtype) for _ in range(2))
    return u, delta, A, B, C, D, delta_bias, z


def in_kernel_layout(u, delta, A, B, C, D, delta_bias, z):
    """Our layout -> the recurrence's (mamba-ssm's) arguments."""
    return (u.transpose(1, 2), delta.transpose(1, 2), A, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D,
            z.transpose(1, 2), delta_bias)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("segment", [4096, 8, 5])
def test_scan_matches_recurrence_in_float64(chunk_size, groups, segment):
    """In one segment, and in segments of 8 or 5 steps (a sequence longer than ``segment`` is scanned segment by
    segment, each from the state the one before left)."""
    inputs = scan_inputs(g=groups)
    expected = recurrence(*in_kernel_layout(*inputs)).transpose(1, 2)
    got = selective_scan_reference(*inputs, chunk_size, segment)
    assert got.shape == (2, 13, 6) and got.dtype == torch.float64
    assert ((got - expected).norm() / expected.norm()).item() < 1e-12


def test_scan_gradients_match_recurrence():
    inputs = [t.requires_grad_() for t in scan_inputs(l=11)]
    weights = torch.randn(2, 11, 6, dtype=torch.float64)
    (selective_scan_reference(*inputs, 4, segment=7) * weights).sum().backward()
    ours = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    (recurrence(*in_kernel_layout(*inputs)).transpose(1, 2) * weights).sum().backward()
    for name, got, t in zip("u delta A B C D delta_bias z".split(), ours, inputs):
        assert ((got - t.grad).norm() / t.grad.norm()).item() < 1e-11, name


def test_scan_in_low_precision():
    """float32 and bfloat16 inputs are computed in float32 and returned in their own dtype; long sequences with
    strong decays stay finite (every exp is of a sum of log-decays <= 0)."""
    inputs = scan_inputs(l=300, d=4, n=3, seed=1)
    expected = recurrence(*in_kernel_layout(*inputs)).transpose(1, 2)
    got = selective_scan_reference(*(t.float() for t in inputs), 16)
    assert got.dtype == torch.float32 and ((got.double() - expected).norm() / expected.norm()).item() < 1e-5
    low = selective_scan_reference(*(t.bfloat16() for t in inputs), 16)
    assert low.dtype == torch.bfloat16 and ((low.double() - expected).norm() / expected.norm()).item() < 3e-2


def branch(x, z, conv, x_proj, dt_proj, A_log, D, d_state):
    """One direction of the release's layer as ``MambaInnerFnNoOutProj`` computes it, with the recurrence."""
    E, l = x.shape[-1], x.shape[1]
    k = conv.weight.shape[-1]
    x = F.silu(F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=k - 1, groups=E)[..., :l])  # (b, E, l)
    x_dbl = x.transpose(1, 2) @ x_proj.weight.T  # (b, l, R + 2n)
    rank = dt_proj.weight.shape[1]
    delta = (x_dbl[..., :rank] @ dt_proj.weight.T).transpose(1, 2)  # (b, E, l), without the bias
    B = x_dbl[..., rank:rank + d_state].transpose(1, 2)[:, None]  # (b, 1, n, l)
    C = x_dbl[..., -d_state:].transpose(1, 2)[:, None]
    return recurrence(x, delta, -torch.exp(A_log), B, C, D, z.transpose(1, 2), dt_proj.bias).transpose(1, 2)


def reference_bimamba(m: BiMamba, hidden: torch.Tensor) -> torch.Tensor:
    """The release's bimamba-v2 forward: out_proj(forward branch(xz) + flip(backward branch(flip(xz))))."""
    x, z = (hidden @ m.in_proj.weight.T).chunk(2, dim=-1)
    forward = branch(x, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, m.d_state)
    backward = branch(x.flip(1), z.flip(1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b, m.d_state)
    return (forward + backward.flip(1)) @ m.out_proj.weight.T


def test_bidirectional_layer_equals_its_two_branches():
    torch.manual_seed(0)
    m = BiMamba(12, d_state=4, dt_rank=3, chunk_size=4, kernel="torch").double()
    with torch.no_grad():
        for p in m.parameters():  # the two branches' weights differ; A stays negative through A_log
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    expected = reference_bimamba(m, x)
    assert ((m(x) - expected).norm() / expected.norm()).item() < 1e-12
    # each token sees the tokens after it (backward branch) as well as before (forward branch)
    later = x.clone()
    later[:, -1] += 1
    assert not torch.allclose(m(later)[:, 0], m(x)[:, 0])


def test_names_shapes_and_init_are_the_releases():
    """Dimba-L's sizes: width 1152, E 2304, d_state 16, dt_rank ceil(1152 / 16) = 72, conv width 4."""
    with torch.device("meta"):
        m = BiMamba(1152)
    shapes = {name: tuple(t.shape) for name, t in m.state_dict().items()}
    branch_shapes = {"conv1d.weight": (2304, 1, 4), "conv1d.bias": (2304,), "x_proj.weight": (104, 2304),
                     "dt_proj.weight": (2304, 72), "dt_proj.bias": (2304,)}
    assert shapes == {"A_log": (2304, 16), "D": (2304,), "A_b_log": (2304, 16), "D_b": (2304,),
                      "in_proj.weight": (4608, 1152), **branch_shapes,
                      **{name.replace(".", "_b.", 1): shape for name, shape in branch_shapes.items()},
                      "out_proj.weight": (1152, 2304)}
    small = BiMamba(32, d_state=4)
    assert torch.equal(small.A_b_log.exp(), torch.arange(1.0, 5.0).expand(64, 4))
    dt = F.softplus(small.dt_proj_b.bias)
    assert (dt >= 1e-3 - 1e-6).all() and (dt <= 0.1 + 1e-6).all() and torch.equal(small.D, torch.ones(64))
    assert all(getattr(p, "_no_weight_decay", False) for p in (small.A_log, small.D, small.A_b_log, small.D_b))


def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Stands in for mamba-ssm's ``selective_scan_fn`` (its signature and layout) on a CPU."""
    assert delta_softplus and u.shape == delta.shape == z.shape and B.dim() == C.dim() == 4
    assert A.dtype == D.dtype == delta_bias.dtype == torch.float32
    return recurrence(u, delta, A, B, C, D, z, delta_bias).to(u.dtype)


def test_kernel_call_uses_mamba_ssms_layout(monkeypatch):
    monkeypatch.setattr(mamba_ops, "selective_scan_kernel", lambda: fake_selective_scan_fn)
    inputs = scan_inputs(dtype=torch.float32)
    got = selective_scan_mamba_ssm(*inputs)
    torch.testing.assert_close(got, selective_scan_reference(*inputs, 4), rtol=1e-5, atol=1e-5)


def test_kernel_is_found_only_when_built(monkeypatch):
    """An importable ``selective_scan_cuda`` stand-in without kernels (no ``fwd``) means no kernel."""
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = fake_selective_scan_fn
    stub = types.ModuleType("selective_scan_cuda")
    for name, module in [("mamba_ssm", types.ModuleType("mamba_ssm")), ("mamba_ssm.ops", types.ModuleType("x")),
                         ("mamba_ssm.ops.selective_scan_interface", interface), ("selective_scan_cuda", stub)]:
        monkeypatch.setitem(sys.modules, name, module)
    find = mamba_ops.selective_scan_kernel.__wrapped__  # uncached
    assert find() is None
    stub.fwd = lambda *args: None
    assert find() is fake_selective_scan_fn
    monkeypatch.delitem(sys.modules, "selective_scan_cuda")
    monkeypatch.setattr(sys, "path", [])
    assert find() is None


def test_forced_kernel_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="kernel='mamba_ssm'.*Set mamba1.kernel to 'auto'"):
        BiMamba(16, kernel="mamba_ssm")(torch.randn(1, 4, 16))
    with pytest.raises(ConfigError, match="unknown BiMamba kernel 'triton'"):
        BiMamba(16, kernel="triton")
    with pytest.raises(ConfigError, match="mamba1.dt_rank is 'big'"):
        BiMamba(16, dt_rank="big")
