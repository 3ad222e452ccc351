import math
import os

import numpy as np
import pytest
import torch
import yaml

from lit_dimba.errors import ConfigError
from lit_dimba.models.backbone import Backbone, BiMambaBlock, Block, MambaConfig, MambaLayer, expand_layout, \
    mamba_positions
from lit_dimba.models.embeddings import sincos_2d
from lit_dimba.models.mamba import Mamba2, Scan2D
from lit_dimba.models.mamba1 import BiMamba
from tests.conftest import BACKBONES, tiny_backbone


def reference_pe(dim, height, width, base_size, interpolation):
    """PixArt-alpha's published formula, written independently in numpy (row-major tokens)."""
    rows = np.arange(height) / (height / base_size) / interpolation
    cols = np.arange(width) / (width / base_size) / interpolation
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    out = np.zeros((height, width, dim))
    for i in range(height):
        for j in range(width):
            a, b = cols[j] * omega, rows[i] * omega
            out[i, j] = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)])
    return out.reshape(height * width, dim)


@pytest.mark.parametrize("grid,base,interp", [((4, 4), 4, 1.0), ((8, 8), 4, 2.0), ((3, 5), 4, 1.0), ((6, 2), 8, 0.5)])
def test_pe_matches_formula(grid, base, interp):
    pe = sincos_2d(16, *grid, base, interp)
    assert pe.shape == (grid[0] * grid[1], 16)
    np.testing.assert_allclose(pe.numpy(), reference_pe(16, *grid, base, interp), atol=1e-6)


def test_pe_interpolation_spans_same_range():
    """PixArt's 1024 setting (grid and base_size doubled, pe_interpolation 2) covers the 512 positions."""
    small = sincos_2d(16, 4, 4, 4, 1.0).reshape(4, 4, 16)
    large = sincos_2d(16, 8, 8, 8, 2.0).reshape(8, 8, 16)
    torch.testing.assert_close(large[::2, ::2], small)


def tiny(**kw):
    torch.manual_seed(0)
    return tiny_backbone("dit_xl2", **kw)


@pytest.mark.parametrize("hw", [(16, 16), (8, 12), (12, 4)])
def test_forward_shapes(hw):
    model = tiny()
    x = torch.randn(2, 4, *hw)
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool)
    out = model(x, torch.tensor([0, 999]), y, mask)
    assert out.shape == (2, 8, *hw)
    assert model.blocks[0].mixer.__class__.__name__ == "SelfAttention"
    assert tiny_backbone("dit_xl2", learn_sigma=False)(x, torch.tensor([3, 4]), y, mask).shape == (2, 4, *hw)


def test_bad_input_is_refused_clearly():
    model = tiny()
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(torch.randn(1, 4, 15, 16), torch.tensor([1]), torch.randn(1, 16, 32), torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_num=16"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.randn(1, 20, 32), torch.ones(1, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown layout 'resnet'"):
        expand_layout("resnet", 4)
    with pytest.raises(ValueError, match="unknown mixer kinds"):
        expand_layout(["attn", "conv"], 2)
    with pytest.raises(ConfigError, match=r"\['mamba_layer'\] are blocks, not mixers: list them in after_each_block"):
        expand_layout(["attn", "mamba_layer"], 2)
    with pytest.raises(ConfigError, match="unknown block kinds \\['conv'\\] in after_each_block"):
        tiny_backbone("dit_xl2", after_each_block=["conv"])
    with pytest.raises(FileNotFoundError):
        tiny_backbone("dit-xxl")


def test_text_conditioning_and_null_caption():
    """Output depends on the caption and masked tokens are ignored; a dropped caption equals the null caption."""
    model = tiny()
    for p in model.parameters():  # zero-initialised output layers hide every dependency; perturb them
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool)
    mask[:, 10:] = False
    base = model(x, t, y, mask)
    y2 = y.clone()
    y2[:, 12:] = 100.0
    torch.testing.assert_close(model(x, t, y2, mask), base)
    assert not torch.allclose(model(x, t, torch.randn_like(y), mask), base)
    dropped = model(x, t, y, mask, torch.tensor([True, False]))
    null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
    torch.testing.assert_close(dropped[0], model(x, t, null, torch.ones_like(mask))[0])
    torch.testing.assert_close(dropped[1], base[1])


@pytest.mark.parametrize("name", ["dit_xl2", "dimba_l2"])
def test_gradient_checkpointing_matches(name):
    torch.manual_seed(0)
    model = tiny_backbone(name)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool))
    model(*args).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(*args).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_dit_xl2_size():
    """PixArt-alpha XL/2 has about 0.61B parameters."""
    with torch.device("meta"):
        model = Backbone.from_file(os.path.join(BACKBONES, "dit_xl2.yaml"))
    count = sum(p.numel() for p in model.parameters())
    assert math.isclose(count, 610_856_096, rel_tol=1e-3)
    assert len(model.blocks) == 28 and model.out_channels == 8


def test_hybrid_layouts():
    """Block kinds and mixer kinds are separate data: ``depth`` PixArt blocks with the layout's mixers, each followed
    by the ``after_each_block`` blocks (Dimba 1:2 here)."""
    dimba = tiny_backbone("dimba_mamba2_l2", after_each_block=["mamba_layer", "mamba_layer"])
    assert [type(block) for block in dimba.blocks] == [Block, MambaLayer, MambaLayer] * 2
    assert dimba.mixers == ["attn", "attn"] and dimba.depth == 2
    t2md = expand_layout("t2md", 28)
    assert [i for i, kind in enumerate(t2md) if kind == "attn"] == [0, 7, 14, 21]
    assert t2md[1:7] == ["mamba_h", "mamba_w"] * 3 and t2md.count("mamba_h") == t2md.count("mamba_w") == 12
    assert set(expand_layout("mamba", 4)) == {"mamba_h", "mamba_w"}


@pytest.mark.parametrize("name,depth", [("dimba_l2", 2), ("dimba_mamba2_l2", 2), ("t2md", 7), ("mamba_xl2", 2)])
@pytest.mark.parametrize("hw", [(8, 8), (8, 12)])
def test_hybrid_forward_backward(name, depth, hw):
    torch.manual_seed(0)
    model = tiny_backbone(name, depth=depth)
    out = model(torch.randn(2, 4, *hw), torch.tensor([5, 900]), torch.randn(2, 16, 32),
                torch.ones(2, 16, dtype=torch.bool))
    assert out.shape == (2, 8, *hw)
    out.square().mean().backward()
    mamba_grads = [p.grad for m in model.modules() if isinstance(m, (Mamba2, BiMamba)) for p in m.parameters()]
    assert mamba_grads and all(g is not None and torch.isfinite(g).all() for g in mamba_grads)


def test_mamba_init_survives_the_transformer_init():
    model = tiny_backbone("t2md", depth=7)
    for name, module in model.named_modules():
        if name.endswith(".mamba"):
            dt = torch.nn.functional.softplus(module.dt_bias)
            assert (dt >= 1e-3 - 1e-6).all() and (dt <= 0.1 + 1e-6).all(), name
            assert torch.equal(module.D, torch.ones_like(module.D))
            assert (module.A_log.exp() >= 1).all() and (module.A_log.exp() <= 16).all()
            assert module.dt_bias.abs().sum() > 0


def test_hybrid_shares_names_with_the_teacher():
    """Everything outside the token mixers has the same name and shape in DiT and T2MD (weight copy by name)."""
    teacher = tiny_backbone("dit_xl2", depth=7).state_dict()
    student = tiny_backbone("t2md", depth=7).state_dict()
    outside = {k: v.shape for k, v in student.items() if ".mixer." not in k}
    assert outside and all(teacher[k].shape == shape for k, shape in outside.items())
    assert all(k in student for k in teacher if ".mixer." not in k)
    attn = [k for k in student if k.startswith("blocks.0.mixer.")]
    assert attn and all(student[k].shape == teacher[k].shape for k in attn)


def test_unidirectional_ablation_and_param_counts():
    uni = tiny_backbone("t2md", depth=7, mamba=MambaConfig(d_state=16, headdim=16, chunk_size=16, bidirectional=False))
    assert not any(".fuse." in k for k in uni.state_dict())
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in Backbone.from_file(os.path.join(BACKBONES, f"{name}.yaml")).parameters())
                  for name in ("t2md", "dimba_l2", "dimba_mamba2_l2", "mamba_xl2")}
    assert 0.7e9 < counts["t2md"] < 0.8e9


@pytest.mark.parametrize("name", ["dit_xl2", "dimba_l2", "dimba_mamba2_l2", "t2md"])
def test_config_rebuilds_the_same_network(name):
    model = tiny_backbone(name, mamba=MambaConfig(d_state=8, headdim=16, bidirectional=False))
    model.pe_interpolation = 2.0  # as a resolution callback would
    again = Backbone.from_config(yaml.safe_load(yaml.safe_dump(model.config)))  # through YAML, as exported
    assert again.layout == model.layout and again.pe_interpolation == 2.0
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def released_dimba_parameters(depth=28, width=1152, patch=2, channels=4, caption=4096, d_state=16, expand=2, conv=4):
    """Dimba_L_2's parameter count, term by term from the release's module definitions (feizc/Dimba
    ``diffusion/model/nets/dimba.py``, ``blocks.py``, Vim's ``Mamba(bimamba_type="v2")``), learned sigma."""
    C, E, R = width, expand * width, math.ceil(width / 16)

    def linear(i, o, bias=True):
        return i * o + (o if bias else 0)

    pixart_block = (linear(C, 3 * C) + linear(C, C)  # self-attention qkv, proj
                    + linear(C, C) + linear(C, 2 * C) + linear(C, C)  # cross-attention q, kv, proj
                    + linear(C, 4 * C) + linear(4 * C, C) + 6 * C)  # MLP, scale_shift_table
    branch = E * conv + E + linear(E, R + 2 * d_state, bias=False) + linear(R, E) + E * d_state + E  # conv .. D
    mamba_block = linear(C, 2 * E, bias=False) + 2 * branch + linear(E, C, bias=False) + C  # + RMSNorm weight
    embedders = (channels * patch**2 * C + C + linear(256, C) + linear(C, C) + linear(C, 6 * C)  # x, t, t_block
                 + linear(caption, C) + linear(C, C))  # y_proj (the null caption is a buffer)
    final = linear(C, patch**2 * 2 * channels) + 2 * C
    return depth * (pixart_block + mamba_block) + embedders + final


def test_dimba_l2_is_the_released_size():
    """configs/backbones/dimba_l2.yaml builds Dimba_L_2: 28 PixArt blocks and 28 Mamba blocks, 859.5M parameters
    (the release's README: 0.9B)."""
    with torch.device("meta"):
        model = Backbone.from_file(os.path.join(BACKBONES, "dimba_l2.yaml"))
    count = sum(p.numel() for p in model.parameters())
    assert count == released_dimba_parameters() == 859_517_600 and round(count / 1e9, 1) == 0.9
    assert model.block_kinds == ["attn", "bimamba"] * 28 and model.y_embedder.y_embedding.shape == (300, 4096)


@pytest.mark.parametrize("depth,ratio,expected", [(8, 1.0, list(range(8))), (8, 0.5, [1, 3, 5, 7]), (8, 0.25, [1, 5]),
                                                  (28, 0.25, [1, 5, 9, 13, 17, 21, 25]), (4, 0.5, [1, 3])])
def test_mamba_ratio_places_blocks_as_the_release(depth, ratio, expected):
    """``Dimba.forward``: a Mamba block after every block when gap = depth // int(ratio * depth) is 1, else after
    block i when i % gap == 1."""
    assert mamba_positions(depth, ratio) == expected
    if depth <= 8:
        model = tiny_backbone("dimba_l2", depth=depth, mamba_ratio=ratio)
        # in execution order: the k-th Mamba block follows PixArt block p, with k Mamba blocks before it
        assert [i for i, kind in enumerate(model.block_kinds) if kind == "bimamba"] == [
            p + k + 1 for k, p in enumerate(expected)]


@pytest.mark.parametrize("ratio,count", [(0.3, 8), (0.75, 21), (0.0, 0), (1.5, 0)])
def test_mamba_ratios_the_release_cannot_place_are_refused(ratio, count):
    with pytest.raises(ConfigError, match=rf"mamba_ratio {ratio} with depth 28: .* = {count} Mamba blocks .*"
                                          r"k / 28 for k in \[1, 2, 3, 4, 7, 9, 14, 28\]"):
        mamba_positions(28, ratio)


def release_forward(model: Backbone, x, t, y, mask, ratio: float):
    """``Dimba.forward`` as the release writes it, over our modules: ``x = blocks[i](x)``, then where a Mamba block
    follows, ``x, residual = mamba_blocks[j](x, residual)``: residual = x for the first, residual + x after, and
    x = mixer(RMSNorm(residual)) (fused add + RMSNorm, eps 1e-5); the final layer takes the last x."""
    grid = model.grid_size(*x.shape[-2:])
    t_emb = model.t_embedder(t)
    x = model.x_embedder(x) + model.pos_embed(grid, x.device)
    t6 = model.t_block(t_emb)
    y, mask = model.y_embedder(y, mask)
    pixart = [block for block in model.blocks if isinstance(block, Block)]
    mamba_blocks = [block for block in model.blocks if isinstance(block, BiMambaBlock)]
    gap = model.depth // int(ratio * model.depth)
    residual = None
    for i, block in enumerate(pixart):
        x = block(x, t6, y, mask, grid)[0]
        if gap == 1 or i % gap == 1:
            mamba = mamba_blocks[i if gap == 1 else i // gap]
            residual = x if residual is None else residual + x
            x = mamba.mixer(residual * torch.rsqrt(residual.square().mean(-1, keepdim=True) + 1e-5) * mamba.norm.weight)
    return model.unpatchify(model.final_layer(x, t_emb), grid)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_released_residual_wiring(ratio):
    torch.manual_seed(0)
    model = tiny_backbone("dimba_l2", depth=4, mamba_ratio=ratio)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output layers would hide differences
            p.add_(torch.randn_like(p) * 0.05)
    args = (torch.randn(2, 4, 8, 6), torch.tensor([5, 900]), torch.randn(2, 16, 32),
            torch.arange(16).expand(2, 16) < torch.tensor([[9], [16]]))
    with torch.no_grad():
        expected = release_forward(model, *args, ratio)
        got = model(*args)
    assert expected.abs().mean() > 0.1 and ((got - expected).norm() / expected.norm()).item() < 1e-6


def test_released_dimba_in_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_backbone("dimba_l2")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 16, 32),
            torch.ones(2, 16, dtype=torch.bool))
    reference = model(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args)
    out.float().square().mean().backward()
    assert ((out.float() - reference).norm() / reference.norm()).item() < 5e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_frozen_backbone_samples_as_before_and_thaws():
    """``Backbone.frozen`` (sampling): no gradients inside, every Scan2D frozen in the GEMMs' dtype (autocast's when
    on), the same output as the plain forward, and training as before afterwards."""
    torch.manual_seed(0)
    model = tiny_backbone("t2md").eval()
    scans = [m for m in model.modules() if isinstance(m, Scan2D)]
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        expected = model(x, t, y, mask)
    with model.frozen():
        assert not torch.is_grad_enabled() and scans and all(scan.frozen for scan in scans)
        torch.testing.assert_close(model(x, t, y, mask), expected, rtol=1e-5, atol=1e-6)
    assert torch.is_grad_enabled() and not any(scan.frozen for scan in scans)
    with torch.autocast("cpu", torch.bfloat16), model.frozen():
        assert scans[0]._in_weight.dtype == torch.bfloat16
    model.train()
    model(x, t, y, mask).square().mean().backward()
    assert all(scan.mamba.in_proj.weight.grad is not None and scan.fuse.weight.grad is not None for scan in scans)
