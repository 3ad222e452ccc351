"""Quality tuning: start from a checkpoint's weights only, a curated subset, the best checkpoint by prompt following."""

import os

import datasets
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import HFDatasetSource, SyntheticShapesSource
from lit_dimba.conditioning import PixelSpace, TinyT5TextEncoder
from lit_dimba.errors import ConfigError
from lit_dimba.models import Backbone
from lit_dimba.modules import DiffusionModule
from main import main
from tests.conftest import DEMO, ROOT, TINY
from tests.test_module import make_module
from tests.test_sources import png

QUALITY = os.path.join(ROOT, "configs", "quality", "demo.yaml")


def test_curated_subsets():
    dataset = SyntheticShapesSource(keep={"size": ["large"], "colour": ["red", "blue"]}).train_dataset(16)
    assert dataset.scenes and all(s.size == "large" and s.colour in ("red", "blue") for s in dataset.scenes)
    assert len(SyntheticShapesSource().train_dataset(16).scenes) > 2 * len(dataset.scenes)
    with pytest.raises(ConfigError, match="unknown attributes \\['sise'\\]"):
        SyntheticShapesSource(keep={"sise": ["large"]})


def test_score_filter(tmp_path):
    path = str(tmp_path / "scored.parquet")
    table = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(6)],
                                        "text": [f"picture {i}" for i in range(6)],
                                        "aesthetic": [4.0, 6.5, None, 7.0, 5.9, 6.0]})
    table.cast_column("image", datasets.Image()).to_parquet(path)
    source = HFDatasetSource("parquet", data_files=path, score_column="aesthetic", min_score=6.0)
    dataset = source.train_dataset(16)
    assert sorted(dataset[i]["caption"] for i in range(len(dataset))) == ["picture 1", "picture 3", "picture 5"]
    with pytest.raises(ConfigError, match="no column 'score'"):
        HFDatasetSource("parquet", data_files=path, score_column="score", min_score=1.0).train_dataset(16)


def test_quality_tuning_config_end_to_end(in_tmp):
    main(["fit", "--config", DEMO, "--config", TINY])  # the checkpoint to tune: ckpt/last.ckpt, 4 steps, with EMA
    start = torch.load("ckpt/last.ckpt", weights_only=True)
    main(["fit", "--config", DEMO, "--config", TINY, "--config", QUALITY, "--model.init_args.init_weights",
          "ckpt/last.ckpt", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--trainer.limit_val_batches", "1"])
    folder = "runs/demo_quality/checkpoints"
    best = [f for f in os.listdir(folder) if f.startswith("best-")]
    assert len(best) == 1 and "last.ckpt" in os.listdir(folder)
    tuned = torch.load(os.path.join(folder, "last.ckpt"), weights_only=True)
    steps = tuned["global_step"]
    assert 0 < steps <= 4, "a fresh step count (weights only), not continued from the 4-step checkpoint"
    assert tuned["optimizer_states"][0]["state"][0]["step"].item() == steps, "a fresh optimizer"
    scalars = EventAccumulator("logs/demo_quality/version_0").Reload().Tags()["scalars"]
    assert "val/prompt_following/all" in scalars and "val/prompt_following/colour" in scalars
    assert start["global_step"] == 4


def test_init_weights_loads_the_ema_average(tmp_path):
    module = make_module()
    for p in module.model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    shadow = {k: v + 1 for k, v in module.model.named_parameters()}
    path = str(tmp_path / "start.ckpt")
    torch.save({"state_dict": module.state_dict(), "callbacks": {"EMA": {"num_updates": 1, "shadow": shadow}}}, path)

    backbone = Backbone(depth=1, hidden_size=32, num_heads=2, patch_size=4, in_channels=3, learn_sigma=False,
                        caption_channels=32, token_num=24, base_size=4)
    tuned = DiffusionModule(backbone, TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace(), init_weights=path)
    assert all(torch.equal(p, shadow[k].detach()) for k, p in tuned.model.named_parameters())
    with pytest.raises(ConfigError, match="init_weights .* does not fit"):
        DiffusionModule(Backbone(depth=2, hidden_size=32, num_heads=2, patch_size=4, in_channels=3, learn_sigma=False,
                            caption_channels=32, token_num=24, base_size=4),
                   TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace(), init_weights=path)
