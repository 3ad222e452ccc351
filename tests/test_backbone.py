import math

import numpy as np
import pytest
import torch

from lit_dimba.models.backbone import Backbone, expand_layout
from lit_dimba.models.embeddings import sincos_2d


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
    return Backbone.from_preset("dit-tiny", **kw)


@pytest.mark.parametrize("hw", [(16, 16), (8, 12), (12, 4)])
def test_forward_shapes(hw):
    model = tiny()
    x = torch.randn(2, 4, *hw)
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool)
    out = model(x, torch.tensor([0, 999]), y, mask)
    assert out.shape == (2, 8, *hw)
    assert model.blocks[0].mixer.__class__.__name__ == "SelfAttention"
    assert Backbone.from_preset("dit-tiny", learn_sigma=False)(x, torch.tensor([3, 4]), y, mask).shape == (2, 4, *hw)


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
    with pytest.raises(ValueError, match="unknown backbone preset"):
        Backbone.from_preset("dit-xxl")


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
        model = Backbone.from_preset("dit-xl/2")
    count = sum(p.numel() for p in model.parameters())
    print(f"dit-xl/2 parameters: {count:,}")
    assert math.isclose(count, 610_856_096, rel_tol=1e-3)
    assert len(model.blocks) == 28 and model.out_channels == 8
