"""The feature cache: sharded writing over ranks, reading back, training from it equals training online, the CLI."""

import glob
import json
import os
import runpy
import sys

import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import default_collate

from datamodules.cache import CachedFeaturesSource, main as cache_main, write_feature_cache
from datamodules.synthetic import SyntheticShapes
from lit_dimba.conditioning import LatentVAE, PixelSpace, TinyT5TextEncoder
from lit_dimba.diffusion import GaussianDiffusion
from lit_dimba.errors import ConfigError
from lit_dimba.models import Backbone
from lit_dimba.modules import DiffusionModule
from main import main
from tests.conftest import DEMO, TINY
from tests.test_conditioning import TINY_VAE_CONFIG

RESOLUTION = 16


def make_module(latent: bool, sample_posterior: bool = False, text_seed: int = 0) -> DiffusionModule:
    """A tiny module on a random tiny KL VAE (latent) or on pixels, with random (not zero) output layers."""
    torch.manual_seed(0)
    vae = LatentVAE(pretrained=None, config=TINY_VAE_CONFIG, sample_posterior=sample_posterior) if latent \
        else PixelSpace()
    backbone = Backbone(depth=1, hidden_size=32, num_heads=2, patch_size=2 if latent else 4,
                        in_channels=vae.latent_channels, learn_sigma=False, caption_channels=32, token_num=24,
                        base_size=4)
    module = DiffusionModule(backbone, TinyT5TextEncoder(d_model=32, max_length=24, seed=text_seed), vae,
                        GaussianDiffusion(prediction_type="v_prediction"), caption_dropout=0.0)
    with torch.no_grad():  # zero-initialised output layers would hide the input from the loss
        for p in module.model.parameters():
            p.normal_(std=0.05)
    return module


def write_cache(module, out_dir, n=10, world_size=2, shard_size=4) -> SyntheticShapes:
    data = SyntheticShapes(n, RESOLUTION)
    for rank in range(world_size):
        write_feature_cache(module, data, str(out_dir), shard_size=shard_size, batch_size=3, rank=rank,
                            world_size=world_size, progress=False)
    return data


def test_encode_distribution_is_the_scaled_posterior():
    torch.manual_seed(0)
    vae = LatentVAE(pretrained=None, config={**TINY_VAE_CONFIG, "shift_factor": 0.25})
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    posterior = vae.vae.encode(images).latent_dist
    mean, std = vae.encode_distribution(images)
    torch.testing.assert_close(mean, (posterior.mean - 0.25) * 0.5)
    torch.testing.assert_close(std, posterior.std * 0.5)
    assert torch.equal(vae.encode(images), mean)
    pixels, zeros = PixelSpace().encode_distribution(images)
    assert torch.equal(pixels, images) and torch.equal(zeros, torch.zeros_like(images))


def test_shards_are_disjoint_cover_every_item_and_read_back_in_order(tmp_path):
    module = make_module(latent=True)
    data = write_cache(module, tmp_path)
    names = sorted(os.path.basename(f) for f in glob.glob(str(tmp_path / "*.safetensors")))
    assert names == ["shard-00000-00000.safetensors", "shard-00000-00001.safetensors",
                     "shard-00001-00000.safetensors", "shard-00001-00001.safetensors"]
    indices = {}
    for name in names:
        with safe_open(str(tmp_path / name), "pt") as f:
            indices[name] = f.get_tensor("index").tolist()
            assert len(json.loads(f.metadata()["captions"])) == len(indices[name])
            assert f.get_tensor("height").tolist() == [RESOLUTION] * len(indices[name])
    assert indices == {names[0]: [0, 2, 4, 6], names[1]: [8], names[2]: [1, 3, 5, 7], names[3]: [9]}
    manifest = json.loads((tmp_path / "manifest-00001.json").read_text())
    assert manifest["count"] == 5 and manifest["resolution"] == [RESOLUTION, RESOLUTION]
    assert manifest["encoders"]["vae"]["class"] == "lit_dimba.conditioning.vae.LatentVAE"

    cached = CachedFeaturesSource(str(tmp_path)).train_dataset(RESOLUTION)
    assert len(cached) == 10
    for i in (0, 5, 9):
        item = data[i]
        mean, std = module.vae.encode_distribution(item["image"][None])
        features, mask = module.text_encoder([item["caption"]])
        assert cached[i]["caption"] == item["caption"]
        torch.testing.assert_close(cached[i]["latent_mean"], mean[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached[i]["latent_std"], std[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached[i]["text_features"], features[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(cached[i]["text_mask"], mask[0])
    with pytest.raises(IndexError):
        cached[10]
    val = CachedFeaturesSource(str(tmp_path), num_val=3).val_dataset(RESOLUTION)
    assert [val[i]["caption"] for i in range(3)] == [data[i]["caption"] for i in (7, 8, 9)]


@pytest.mark.parametrize("latent", [True, False], ids=["latent_vae", "pixel_space"])
def test_loss_from_cache_equals_online_loss_and_skips_the_encoders(tmp_path, latent, monkeypatch):
    module = make_module(latent=latent)
    data = write_cache(module, tmp_path)
    online = default_collate([data[i] for i in range(8)])
    cached = default_collate([CachedFeaturesSource(str(tmp_path)).train_dataset(RESOLUTION)[i] for i in range(8)])
    assert cached["latent_mean"].shape[0] == 8 and cached["text_mask"].dtype == torch.bool
    assert cached["caption"] == online["caption"]
    per_sample = {}  # the diffusion's per-sample losses, recorded on their way to the module's mean
    training_losses = module.diffusion.training_losses
    monkeypatch.setattr(module.diffusion, "training_losses",
                        lambda *args: per_sample.setdefault(len(per_sample), training_losses(*args)))
    expected = module.batch_losses(online, 0.0, torch.Generator().manual_seed(0))

    def fail(*args):
        raise AssertionError("an encoder ran on a cached batch")

    module.batch_encoders = CachedFeaturesSource(str(tmp_path)).encoders(module)  # as setup (its check probes)
    monkeypatch.setattr(module.vae, "encode", fail)
    monkeypatch.setattr(module.text_encoder, "forward", fail)
    losses = module.batch_losses(cached, 0.0, torch.Generator().manual_seed(0))
    online_losses, cached_losses = per_sample[0]["loss"], per_sample[1]["loss"]
    assert online_losses.min() > 0.01 and not torch.allclose(online_losses, online_losses[:1].expand(8))
    torch.testing.assert_close(cached_losses, online_losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss"], expected["loss"], rtol=1e-5, atol=1e-7)


def test_sample_posterior_draws_around_the_cached_mean(tmp_path):
    module = make_module(latent=True, sample_posterior=True)
    write_cache(module, tmp_path, n=4, world_size=1)
    batch = default_collate([CachedFeaturesSource(str(tmp_path)).train_dataset(RESOLUTION)[i] for i in range(4)])
    mean, std = batch["latent_mean"], batch["latent_std"]
    assert std.min() > 0
    torch.manual_seed(0)
    n = 400
    encoders = CachedFeaturesSource(str(tmp_path)).encoders(module)
    draws = torch.stack([encoders(batch)[0] for _ in range(n)])
    assert not torch.equal(draws[0], draws[1])
    assert ((draws.mean(0) - mean).abs() <= 5 * std / n ** 0.5).all()
    torch.testing.assert_close(draws.std(0).mean(), std.mean(), rtol=0.05, atol=0)


def test_bad_caches_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing' does not exist.*python -m datamodules.cache --config"):
        CachedFeaturesSource(str(tmp_path / "missing")).train_dataset(RESOLUTION)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is empty.*python -m datamodules.cache"):
        CachedFeaturesSource(str(tmp_path / "empty")).train_dataset(RESOLUTION)

    module = make_module(latent=False)
    write_cache(module, tmp_path / "cache", n=6)
    source = CachedFeaturesSource(str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="holds 16x16 images but data.resolution=32; set data.resolution=16"):
        source.train_dataset(32)
    with pytest.raises(ConfigError, match="no validation data; set source.init_args.val_path"):
        source.val_dataset(RESOLUTION)
    with pytest.raises(ConfigError, match="no test prompts"):
        source.test_prompts()
    with pytest.raises(ConfigError, match="already holds files of writer 1"):
        write_feature_cache(module, SyntheticShapes(6, RESOLUTION), str(tmp_path / "cache"), rank=1, world_size=2)
    source.check_encoders(module)
    with pytest.raises(ConfigError, match="built with other encoders: text_encoder gives other outputs"):
        source.check_encoders(make_module(latent=False, text_seed=1))

    write_feature_cache(module, SyntheticShapes(6, RESOLUTION), str(tmp_path / "half"), rank=0, world_size=2,
                        progress=False)
    with pytest.raises(ConfigError, match=r"lacks writer\(s\) \[1\].*--rank 1 --world_size 2"):
        CachedFeaturesSource(str(tmp_path / "half")).train_dataset(RESOLUTION)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'datamodules.cache' found in sys.modules")  # runpy: the test module imported it
def test_command_line_writes_the_cache_and_fit_trains_from_it(in_tmp, monkeypatch, capsys):
    args = ["--config", DEMO, "--config", TINY, "--out", "cache", "--max_items", "12", "--shard_size", "4"]
    # `python -m datamodules.cache` as writer 0 of 2 (ranks from the environment), run in this process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["python -m datamodules.cache", *args])
    runpy.run_module("datamodules.cache", run_name="__main__", alter_sys=True)
    assert "wrote 6 of 12 items (train) in 2 shards to cache (writer 0 of 2)" in capsys.readouterr().out
    cache_main([*args, "--rank", "1", "--world_size", "2"])
    assert sorted(os.listdir("cache")) == ["manifest-00000.json", "manifest-00001.json",
                                           "shard-00000-00000.safetensors", "shard-00000-00001.safetensors",
                                           "shard-00001-00000.safetensors", "shard-00001-00001.safetensors"]

    source = json.dumps({"class_path": "datamodules.cache.CachedFeaturesSource",
                         "init_args": {"path": "cache", "num_val": 4}})
    main(["fit", "--config", DEMO, "--config", TINY, "--data.init_args.source", source, "--trainer.max_steps", "2"])
    ckpt = torch.load("ckpt/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert {"train/loss", "val/loss"} <= set(EventAccumulator("logs/tiny/version_0").Reload().Tags()["scalars"])

    # the T5 can be dropped once the features are cached: it is then never built
    no_text = [*"fit --config".split(), DEMO, "--config", TINY, "--data.init_args.source", source,
               "--model.init_args.text_encoder", "null", "--trainer.max_steps", "2"]
    with pytest.raises(SystemExit, match="text_encoder is null but callbacks.SampleLogger generates images"):
        main(no_text)
    callbacks = json.dumps([{"class_path": "callbacks.EMA"},
                            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": "ckpt_no_text", "save_last": True}}])
    main([*no_text, "--trainer.callbacks", callbacks])
    ckpt = torch.load("ckpt_no_text/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and all(k.startswith("model.") for k in ckpt["state_dict"])
    online = ["fit", "--config", DEMO, "--config", TINY, "--model.init_args.text_encoder", "null"]
    with pytest.raises(SystemExit, match="text_encoder is null but data.source SyntheticShapesSource gives captions"):
        main([*online, "--trainer.callbacks", "[]"])
