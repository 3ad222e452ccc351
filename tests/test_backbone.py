import math
import os

import numpy as np
import pytest
import torch
import yaml

from lit_dimba.errors import ConfigError
from lit_dimba.models.backbone import Backbone, Block, MambaConfig, MambaLayer, expand_layout
from lit_dimba.models.embeddings import sincos_2d
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


def test_gradient_checkpointing_matches():
    model = tiny()
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
    dimba = tiny_backbone("dimba_l2", after_each_block=["mamba_layer", "mamba_layer"])
    assert [type(block) for block in dimba.blocks] == [Block, MambaLayer, MambaLayer] * 2
    assert dimba.mixers == ["attn", "attn"] and dimba.depth == 2
    t2md = expand_layout("t2md", 28)
    assert [i for i, kind in enumerate(t2md) if kind == "attn"] == [0, 7, 14, 21]
    assert t2md[1:7] == ["mamba_h", "mamba_w"] * 3 and t2md.count("mamba_h") == t2md.count("mamba_w") == 12
    assert set(expand_layout("mamba", 4)) == {"mamba_h", "mamba_w"}


@pytest.mark.parametrize("name,depth", [("dimba_l2", 2), ("t2md", 7), ("mamba_xl2", 2)])
@pytest.mark.parametrize("hw", [(8, 8), (8, 12)])
def test_hybrid_forward_backward(name, depth, hw):
    torch.manual_seed(0)
    model = tiny_backbone(name, depth=depth)
    out = model(torch.randn(2, 4, *hw), torch.tensor([5, 900]), torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool))
    assert out.shape == (2, 8, *hw)
    out.square().mean().backward()
    mamba_grads = [p.grad for n, p in model.named_parameters() if ".mamba." in n]
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
                  for name in ("t2md", "dimba_l2", "mamba_xl2")}
    assert 0.7e9 < counts["t2md"] < 0.8e9


@pytest.mark.parametrize("name", ["dit_xl2", "dimba_l2", "t2md"])
def test_config_rebuilds_the_same_network(name):
    model = tiny_backbone(name, mamba=MambaConfig(d_state=8, headdim=16, bidirectional=False))
    model.pe_interpolation = 2.0  # as a resolution callback would
    again = Backbone.from_config(yaml.safe_load(yaml.safe_dump(model.config)))  # through YAML, as exported
    assert again.layout == model.layout and again.pe_interpolation == 2.0
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
