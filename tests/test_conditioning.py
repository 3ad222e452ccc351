"""Tests for the frozen text encoders and autoencoders (tiny models, no downloads)."""

import pytest
import torch
from torch import nn

from lit_dimba.conditioning.encoders import FrozenEncoders
from lit_dimba.conditioning.frozen import FrozenModule
from lit_dimba.conditioning.text import TextEncoder, TinyT5TextEncoder
from lit_dimba.conditioning.vae import LatentVAE, PixelSpace
from lit_dimba.errors import ConfigError

CAPTIONS = ["a red cube on a table", "", "cat"]

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.5,
}


@pytest.fixture(scope="module")
def tiny_t5() -> TinyT5TextEncoder:
    return TinyT5TextEncoder(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_length=24, seed=0)


@pytest.fixture
def tiny_vae() -> LatentVAE:
    torch.manual_seed(0)
    return LatentVAE(pretrained=None, config=TINY_VAE_CONFIG)


def assert_frozen(module: FrozenModule) -> None:
    assert all(not p.requires_grad for p in module.parameters())
    parent = nn.Sequential(nn.Linear(2, 2), module)
    parent.train()
    assert parent[0].training
    assert not any(m.training for m in module.modules())


# ----------------------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------------------


def test_tiny_t5_shapes_and_mask(tiny_t5):
    features, mask = tiny_t5(CAPTIONS)
    assert features.shape == (3, 24, 32) and features.dtype == torch.float32
    assert mask.shape == (3, 24) and mask.dtype == torch.bool
    # Byte-level tokens plus EOS; the mask is a prefix of True values.
    assert mask.sum(1).tolist() == [len("a red cube on a table") + 1, 1, len("cat") + 1]
    assert torch.equal(mask, torch.arange(24) < mask.sum(1, keepdim=True))
    assert tiny_t5.hidden_size == 32 and tiny_t5.max_length == 24


def test_tiny_t5_truncates_long_captions(tiny_t5):
    _, mask = tiny_t5(["x" * 100])
    assert mask.shape == (1, 24) and mask.all()


def test_tiny_t5_tokenizes_as_byt5(tiny_t5):
    """The vectorised byte tokenizer gives ByT5Tokenizer's ids and mask: multi-byte characters, empty captions,
    captions of max_length - 1, max_length and more bytes."""
    captions = ["a red cube on a table", "", "ünïcødé ✓", "x" * 23, "y" * 24, "z" * 100, "tab\tand  spaces", "ß"]
    ours = tiny_t5.tokenize(captions)
    theirs = TextEncoder.tokenize(tiny_t5, captions)  # the tokenizer's own call
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert torch.equal(tiny_t5.tokenize([""])[0], TextEncoder.tokenize(tiny_t5, [""])[0])


def test_tiny_t5_deterministic_per_seed_and_keeps_global_rng():
    state = torch.get_rng_state()
    first = TinyT5TextEncoder(d_model=32, d_ff=64, max_length=24, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    same = TinyT5TextEncoder(d_model=32, d_ff=64, max_length=24, seed=0)
    other = TinyT5TextEncoder(d_model=32, d_ff=64, max_length=24, seed=1)
    features, _ = first(CAPTIONS)
    assert torch.equal(features, same(CAPTIONS)[0])
    assert not torch.allclose(features, other(CAPTIONS)[0])


def test_tiny_t5_features_independent_of_batch(tiny_t5):
    alone, alone_mask = tiny_t5(["cat"])
    batched, batched_mask = tiny_t5(["a much longer caption about a dog", "cat", ""])
    assert torch.equal(alone_mask[0], batched_mask[1])
    torch.testing.assert_close(alone[0], batched[1], rtol=0, atol=1e-5)
    # Different captions do give different features.
    assert not torch.allclose(batched[0], batched[1])


def test_tiny_t5_is_frozen(tiny_t5):
    assert_frozen(tiny_t5)
    features, _ = tiny_t5(CAPTIONS)
    assert not features.requires_grad


def test_text_encoder_reloads_from_local_folder(tiny_t5, tmp_path):
    tiny_t5.save_pretrained(tmp_path)
    reloaded = TextEncoder(pretrained=str(tmp_path), max_length=24)
    assert type(reloaded.encoder) is type(tiny_t5.encoder)
    assert reloaded.hidden_size == 32
    features, mask = tiny_t5(CAPTIONS)
    reloaded_features, reloaded_mask = reloaded(CAPTIONS)
    assert torch.equal(mask, reloaded_mask)
    assert torch.equal(features, reloaded_features)
    assert_frozen(reloaded)


def test_text_encoder_bfloat16_returns_float32(tiny_t5, tmp_path):
    tiny_t5.save_pretrained(tmp_path)
    reloaded = TextEncoder(pretrained=str(tmp_path), max_length=24, dtype="bfloat16")
    assert reloaded.encoder.dtype == torch.bfloat16
    features, _ = reloaded(CAPTIONS)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, tiny_t5(CAPTIONS)[0], rtol=0.1, atol=0.1)


def test_text_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype='float64'.*bfloat16"):
        TextEncoder(pretrained=str(tmp_path), dtype="float64")
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        TextEncoder(pretrained=missing)
    with pytest.raises(OSError, match="(?s)pretrained=.*config.json"):
        TextEncoder(pretrained=str(tmp_path))  # exists but empty


# ----------------------------------------------------------------------------------------------------------
# Autoencoders
# ----------------------------------------------------------------------------------------------------------


def test_latent_vae_shapes_and_scaling(tiny_vae):
    assert tiny_vae.latent_channels == 4 and tiny_vae.downsample_factor == 2
    assert tiny_vae.scaling_factor == 0.5 and tiny_vae.shift_factor == 0.0
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    latents = tiny_vae.encode(images)
    assert latents.shape == (2, 4, 8, 12) and latents.dtype == torch.float32
    mean = tiny_vae.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, mean * 0.5)
    decoded = tiny_vae.decode(latents)
    assert decoded.shape == (2, 3, 16, 24) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, tiny_vae.vae.decode(mean).sample)


def test_latent_vae_shift_factor():
    torch.manual_seed(0)
    vae = LatentVAE(pretrained=None, config={**TINY_VAE_CONFIG, "shift_factor": 0.25})
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    mean = vae.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(vae.encode(images), (mean - 0.25) * 0.5)


def test_latent_vae_sample_posterior_is_random():
    torch.manual_seed(0)
    vae = LatentVAE(pretrained=None, config=TINY_VAE_CONFIG, sample_posterior=True)
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    assert not torch.equal(vae.encode(images), vae.encode(images))


def test_latent_vae_reloads_from_local_folder(tiny_vae, tmp_path):
    tiny_vae.vae.save_pretrained(tmp_path)
    reloaded = LatentVAE(pretrained=str(tmp_path))
    assert reloaded.scaling_factor == 0.5
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(tiny_vae.encode(images), reloaded.encode(images))
    assert_frozen(reloaded)


def test_latent_vae_errors(tiny_vae, tmp_path):
    with pytest.raises(ValueError, match="15x16.*2"):
        tiny_vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="exactly one"):
        LatentVAE(config=TINY_VAE_CONFIG)
    with pytest.raises(ValueError, match="exactly one"):
        LatentVAE(pretrained=None)
    with pytest.raises(ValueError, match="dtype='half'"):
        LatentVAE(pretrained=None, config=TINY_VAE_CONFIG, dtype="half")
    with pytest.raises(FileNotFoundError, match="missing"):
        LatentVAE(pretrained=str(tmp_path / "missing"))
    with pytest.raises(OSError, match="(?s)pretrained=.*config.json"):
        LatentVAE(pretrained=str(tmp_path))  # exists but empty


def test_latent_vae_is_frozen(tiny_vae):
    assert_frozen(tiny_vae)
    latents = tiny_vae.encode(torch.zeros(1, 3, 8, 8))
    assert not latents.requires_grad


def test_pixel_space_round_trips():
    pixels = PixelSpace()
    assert pixels.latent_channels == 3 and pixels.downsample_factor == 1
    images = (torch.rand(2, 3, 5, 7) * 2 - 1).half()
    latents = pixels.encode(images)
    assert latents.dtype == torch.float32 and torch.equal(latents, images.float())
    assert torch.equal(pixels.decode(latents), latents)
    assert_frozen(pixels)


def test_captions_without_a_text_encoder_name_the_field():
    with pytest.raises(ConfigError, match="model.text_encoder is null"):
        FrozenEncoders(None, PixelSpace())({"image": torch.zeros(1, 3, 8, 8), "caption": ["a red circle"]})
