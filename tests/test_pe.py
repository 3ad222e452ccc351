"""Positional-embedding modes and the PEInterpolation callback."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_dimba.models import Backbone
from lit_dimba.models.embeddings import sincos_1d, sincos_2d
from main import main
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


def fit_with(name, callbacks, *extra):
    main(["fit", "--config", DEMO, "--config", TINY, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.logger.init_args.name", name,
          "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                              "init_args": {"dirpath": name, "save_last": True}}, *callbacks]),
          *extra])
    return torch.load(f"{name}/last.ckpt", weights_only=True)["backbone_config"]


def test_pe_interpolation_callback_follows_the_data_resolution(in_tmp):
    # tiny.yaml: pixel space, patch 4, data at 16^2 (a 4 x 4 grid); the demo leaves base_size null
    plain = fit_with("plain", [])
    assert (plain["base_size"], plain["pe_interpolation"]) == (None, 1.0), "no callback: as configured"
    callback = {"class_path": "callbacks.PEInterpolation", "init_args": {"base_resolution": 16}}
    config = fit_with("follow", [callback], "--data.init_args.resolution", "32")
    assert (config["base_size"], config["pe_interpolation"], config["pe_mode"]) == (None, 2.0, "pixart")
    scalars = EventAccumulator("logs/follow/version_0").Reload()
    assert [e.value for e in scalars.Scalars("pe/interpolation")] == [2.0, 2.0]
    assert [e.value for e in scalars.Scalars("data/resolution")] == [32.0, 32.0]
    centred = {"class_path": "callbacks.PEInterpolation", "init_args": {"base_resolution": 16, "mode": "centred"}}
    assert fit_with("centred", [centred])["pe_mode"] == "centred"
    off = {"class_path": "callbacks.PEInterpolation", "init_args": {"base_resolution": 16, "interpolate": False}}
    assert fit_with("off", [off], "--data.init_args.resolution", "32")["pe_interpolation"] == 1.0


def pe_after_training(name: str, resolution: int, interpolate: bool | None) -> torch.Tensor:
    """The positional embedding (h, w, hidden) the model has after fitting at ``resolution`` (patch 4, pixel space)
    with PEInterpolation(base_resolution=16, interpolate) or, for None, without the callback."""
    callbacks = [] if interpolate is None else [{"class_path": "callbacks.PEInterpolation",
                                                "init_args": {"base_resolution": 16, "interpolate": interpolate}}]
    model = Backbone.from_config(fit_with(name, callbacks, "--data.init_args.resolution", str(resolution)))
    side = resolution // 4
    return model.pos_embed((side, side), torch.device("cpu"))[0].reshape(side, side, -1)


def test_interpolation_changes_the_embedding_off_the_base_resolution(in_tmp):
    base_plain, base_interp = pe_after_training("a", 16, None), pe_after_training("b", 16, True)
    torch.testing.assert_close(base_interp, base_plain, rtol=0, atol=0)  # at the base resolution: the same
    plain, interp, off = (pe_after_training(name, 32, mode) for name, mode in (("c", None), ("d", True), ("e", False)))
    assert (plain - interp).abs().max() > 0.5, "at twice the base resolution the callback must change the PE"
    torch.testing.assert_close(off, plain, rtol=0, atol=0)  # interpolate: false is the ablation: as without
    # Interpolation: every second token of the 8 x 8 grid sits where the 4 x 4 base grid's tokens were.
    torch.testing.assert_close(interp[::2, ::2], base_plain, rtol=0, atol=1e-6)
    # Extrapolation: the first 4 x 4 tokens keep the base positions, the rest step on beyond them.
    torch.testing.assert_close(plain[:4, :4], base_plain, rtol=0, atol=1e-6)
