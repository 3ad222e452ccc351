"""Positional-embedding modes, PE interpolation as a function of the input grid, and the PEInterpolation callback:
the embedding a forward actually adds, against sin-cos written out independently."""

import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import PEInterpolation
from lit_dimba.conditioning import PixelSpace, TinyT5TextEncoder
from lit_dimba.errors import ConfigError
from lit_dimba.models import Backbone
from lit_dimba.models.embeddings import sincos_1d, sincos_2d
from main import main
from lit_dimba.modules import DiffusionModule
from tests.conftest import DEMO, TINY


@pytest.mark.parametrize("height,width,base,interp", [(4, 8, 8, 1.0), (6, 3, 4, 2.0), (5, 5, 16, 4.0)])
def test_centred_pe_shares_one_step_and_is_centred(height, width, base, interp):
    dim = 16
    pe = sincos_2d(dim, height, width, base, interp, mode="centred").reshape(height, width, dim)
    step = base / interp / max(height, width)
    rows = (torch.arange(height, dtype=torch.float64) - (height - 1) / 2) * step
    cols = (torch.arange(width, dtype=torch.float64) - (width - 1) / 2) * step
    torch.testing.assert_close(pe[0, :, : dim // 2], sincos_1d(dim // 2, cols).float())  # columns, any row
    torch.testing.assert_close(pe[:, 0, dim // 2:], sincos_1d(dim // 2, rows).float())  # rows, any column
    # centred: mirrored tokens have opposite sines and equal cosines
    torch.testing.assert_close(pe[0, 0, : dim // 4], -pe[-1, -1, : dim // 4])
    torch.testing.assert_close(pe[0, 0, dim // 4: dim // 2], pe[-1, -1, dim // 4: dim // 2])


def test_centred_long_edge_steps_like_pixarts_square_grid():
    """Sin-cos inner products depend only on position differences: a 2:1 grid in centred mode has PixArt's square
    spacing on its long edge, and the same spacing (not stretched) on its short edge."""
    base, dim = 8, 64
    square = sincos_2d(dim, base, base, base, 1.0).reshape(base, base, dim)
    wide = sincos_2d(dim, base // 2, base, base, 1.0, mode="centred").reshape(base // 2, base, dim)
    gram = lambda e: e @ e.T  # noqa: E731
    torch.testing.assert_close(gram(wide[0, :, : dim // 2]), gram(square[0, :, : dim // 2]))  # columns
    torch.testing.assert_close(gram(wide[:, 0, dim // 2:]), gram(square[: base // 2, 0, dim // 2:]))  # rows
    stretched = sincos_2d(dim, base // 2, base, base, 1.0).reshape(base // 2, base, dim)  # PixArt mode
    assert not torch.allclose(gram(stretched[:, 0, dim // 2:]), gram(square[: base // 2, 0, dim // 2:]))
    with pytest.raises(ValueError, match="pe_mode"):
        Backbone(depth=1, hidden_size=32, num_heads=2, pe_mode="long-edge")


def reference_pe(dim: int, height: int, width: int, step: float, centred: bool = False) -> np.ndarray:
    """(height * width, dim) 2-D sin-cos PE in numpy: token (i, j) at row position i * step and column position
    j * step (minus the middle of the grid when ``centred``); columns in the first half, each half sin then cos at
    frequencies 1 / 10000^(k / (dim / 4))."""
    rows, cols = np.arange(height) * step, np.arange(width) * step
    if centred:
        rows, cols = rows - rows.mean(), cols - cols.mean()
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")

    def embed(positions):
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([embed(grid_cols), embed(grid_rows)], axis=1)


class UsedPE:
    """Records the positional embedding a backbone's forward adds: the first block's input minus the patch
    embedding, (h * w, hidden) of the first sample, with the token grid (h, w) of the input."""

    def __init__(self, model: Backbone):
        self.model = model
        self.pe, self.grid = None, None
        self._embedded = None
        self.hooks = [model.x_embedder.register_forward_hook(self._patches),
                      model.blocks[0].register_forward_pre_hook(self._tokens)]

    def _patches(self, module, args, out):
        self._embedded = out
        self.grid = self.model.grid_size(*args[0].shape[-2:])

    def _tokens(self, module, args):
        self.pe = (args[0] - self._embedded)[0].detach().double().numpy()


def forward_pe(model: Backbone, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The PE a forward of ``model`` adds for an input of height x width latent pixels, and the input's grid."""
    used = UsedPE(model)
    x = torch.randn(1, model.in_channels, height, width)
    model(x, torch.tensor([10]), torch.randn(1, model.token_num, model.caption_channels),
          torch.ones(1, model.token_num, dtype=torch.bool))
    for hook in used.hooks:
        hook.remove()
    return used.pe, used.grid


def tiny_backbone(**pe) -> Backbone:
    """Pixel space, patch 4: an input of 16^2 pixels is a 4 x 4 token grid."""
    return Backbone(depth=1, hidden_size=32, num_heads=2, patch_size=4, in_channels=3, learn_sigma=False,
                    caption_channels=32, token_num=24, **pe)


@pytest.mark.parametrize("mode", ["pixart", "centred"])
def test_forward_interpolates_the_pe_from_its_input_grid(mode):
    """With pe_base_grid 4, each input's positions step by 4 / sqrt(h * w) per token: a 16^2 input (4 x 4 tokens)
    at 1, 32^2 at 1/2, a 16 x 64 aspect bucket (4 x 16 tokens) also at 1/2; base_size is then not used."""
    model = tiny_backbone(pe_base_grid=4, pe_mode=mode, base_size=7)
    pes = {}
    for height, width in ((16, 16), (32, 32), (16, 64), (24, 40)):
        pe, (h, w) = forward_pe(model, height, width)
        np.testing.assert_allclose(pe, reference_pe(32, h, w, 4 / math.sqrt(h * w), mode == "centred"), atol=1e-5)
        pes[height, width] = pe.reshape(h, w, 32)
        assert model.pe_scale((h, w)) == math.sqrt(h * w) / 4
    if mode == "pixart":  # every second token of the 8 x 8 grid sits where the 4 x 4 base grid's tokens were
        np.testing.assert_allclose(pes[32, 32][::2, ::2], pes[16, 16], atol=1e-5)


def test_without_a_base_grid_the_pe_extrapolates():
    model = tiny_backbone()
    base, _ = forward_pe(model, 16, 16)
    large, _ = forward_pe(model, 32, 32)
    np.testing.assert_allclose(large, reference_pe(32, 8, 8, 1.0), atol=1e-5)  # one step per token
    np.testing.assert_allclose(large.reshape(8, 8, 32)[:4, :4], base.reshape(4, 4, 32), atol=1e-5)
    model.pe_interpolation = 2.0
    np.testing.assert_allclose(forward_pe(model, 32, 32)[0], reference_pe(32, 8, 8, 0.5), atol=1e-5)


def tiny_module(**pe) -> DiffusionModule:
    return DiffusionModule(tiny_backbone(**pe), TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace())


def test_callback_hands_the_base_grid_once():
    """The callback turns base_resolution (pixels) into the backbone's base grid, once, at setup; every input's PE
    then follows its own grid. interpolate: false leaves the PE as configured; mode switches pe_mode."""
    module = tiny_module()
    PEInterpolation(base_resolution=32).setup(None, module, "fit")  # 32 pixels / patch 4: an 8 x 8 base grid
    for size in (16, 32, 64):
        pe, (h, w) = forward_pe(module.model, size, size)
        np.testing.assert_allclose(pe, reference_pe(32, h, w, 8 / h), atol=1e-5)
    off = tiny_module()
    PEInterpolation(base_resolution=32, interpolate=False, mode="centred").setup(None, off, "fit")
    np.testing.assert_allclose(forward_pe(off.model, 64, 64)[0], reference_pe(32, 16, 16, 1.0, centred=True), atol=1e-5)
    with pytest.raises(ConfigError, match="not divisible by 4"):
        PEInterpolation(base_resolution=30).setup(None, tiny_module(), "fit")


def test_fit_saves_the_base_grid_and_logs_the_batch_resolution(in_tmp):
    """Through the CLI at 32^2 with base 16^2: the logs take the resolution from the batches, and the checkpoint's
    backbone config rebuilds a backbone that interpolates at any size (exports, test, predict)."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpt", "save_last": True}},
                 {"class_path": "callbacks.PEInterpolation", "init_args": {"base_resolution": 16}}]
    main(["fit", "--config", DEMO, "--config", TINY, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--data.init_args.resolution", "32", "--trainer.callbacks", json.dumps(callbacks)])
    scalars = EventAccumulator("logs/tiny/version_0").Reload()
    assert [e.value for e in scalars.Scalars("pe/interpolation")] == [2.0, 2.0]
    assert [e.value for e in scalars.Scalars("data/resolution")] == [32.0, 32.0]
    config = torch.load("ckpt/last.ckpt", weights_only=True)["backbone_config"]
    assert config["pe_base_grid"] == 4
    pe, _ = forward_pe(Backbone.from_config(config), 48, 48)  # a 12 x 12 grid: a third of a step per token
    np.testing.assert_allclose(pe, reference_pe(32, 12, 12, 4 / 12), atol=1e-5)


def test_distillation_teacher_gets_the_students_positions(tmp_path):
    """In distillation the callback sets the teacher's PE base as well as the student's: at a resolution above the
    base both add the same (interpolated) embedding, so the teacher's targets are those of the positions it learned."""
    from safetensors.torch import save_file

    from lit_dimba.modules import DistillModule

    teacher_file = str(tmp_path / "teacher.safetensors")
    save_file(tiny_backbone().state_dict(), teacher_file)
    module = DistillModule(tiny_backbone(layout=["mamba_h"]), tiny_backbone(), teacher_file,
                           TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace())
    PEInterpolation(base_resolution=32, mode="centred").setup(None, module, "fit")
    for backbone in (module.model, module.teacher):
        pe, (h, w) = forward_pe(backbone, 64, 64)
        np.testing.assert_allclose(pe, reference_pe(32, h, w, 8 / h, centred=True), atol=1e-5)
