import pytest
import torch

from datamodules import CaptionImageDataModule, SyntheticShapesSource
from lit_dimba.errors import ConfigError


def make(**kw):
    return CaptionImageDataModule(SyntheticShapesSource(num_train=64, num_val=8, num_test_prompts=5), **kw)


def test_batches_and_splits():
    dm = make(resolution=24, batch_size=4, val_batch_size=3, seed=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and len(batch["caption"]) == 4
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert torch.equal(next(iter(make(resolution=24, batch_size=4, seed=1).train_dataloader()))["image"], batch["image"])
    assert not torch.equal(next(iter(make(resolution=24, batch_size=4, seed=2).train_dataloader()))["image"], batch["image"])
    val = [b["caption"] for b in dm.val_dataloader()]
    assert [len(c) for c in val] == [3, 3, 2] and val == [b["caption"] for b in dm.val_dataloader()]
    train_captions = {c for b in dm.train_dataloader() for c in b["caption"]}
    assert not train_captions & {c for b in val for c in b}
    test = next(iter(dm.test_dataloader()))
    assert test["index"].tolist() == [0, 1, 2] and test["height"].tolist() == [24] * 3
    assert {"caption", "colour", "shape", "position", "size"} <= set(test)


def test_predict_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \n")
    batch = next(iter(make(resolution=16, predict_prompts=str(path)).predict_dataloader()))
    assert batch["caption"] == ["first prompt", "second prompt"] and batch["width"].tolist() == [16, 16]
    assert next(iter(make(predict_prompts=["a", "b", "c"]).predict_dataloader()))["index"].tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="does not exist"):
        make(predict_prompts=str(tmp_path / "missing.txt")).predict_dataloader()
    with pytest.raises(ConfigError, match="predict_prompts"):
        make().predict_dataloader()


def test_bad_resolution():
    with pytest.raises(ConfigError, match="data.resolution"):
        make(resolution=0)
