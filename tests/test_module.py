import pytest
import torch

from datamodules.synthetic import SyntheticShapes
from lit_dimba.conditioning import PixelSpace, TinyT5TextEncoder
from lit_dimba.diffusion import GaussianDiffusion
from lit_dimba.errors import ConfigError
from lit_dimba.models import Backbone
from lit_dimba.modules import DiffusionModule, Sampling


def make_module(depth=1, learn_sigma=False, prediction_type="epsilon"):
    torch.manual_seed(0)
    backbone = Backbone(depth=depth, hidden_size=32, num_heads=2, patch_size=4, in_channels=3, learn_sigma=learn_sigma,
                        caption_channels=32, token_num=24, base_size=4)
    return DiffusionModule(backbone, TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace(),
                      GaussianDiffusion(prediction_type=prediction_type), caption_dropout=0.0,
                      optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))


def fixed_batch(n=8, resolution=16):
    data = SyntheticShapes(n, resolution)
    items = [data[i] for i in range(n)]
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}


@pytest.mark.parametrize("learn_sigma,prediction_type", [(False, "epsilon"), (True, "epsilon"), (False, "v_prediction")])
def test_loss_goes_down(learn_sigma, prediction_type):
    module = make_module(learn_sigma=learn_sigma, prediction_type=prediction_type)
    optimizer = module.configure_optimizers()
    batch = fixed_batch()
    losses = []
    for _ in range(40):
        loss = module.batch_losses(batch, 0.0, torch.Generator().manual_seed(0))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert all(p.grad is None for p in module.text_encoder.parameters()), "the text encoder must stay frozen"


def test_state_dict_round_trip_without_frozen_encoders():
    module = make_module()
    state = module.state_dict()
    assert state and not any(k.startswith(("text_encoder.", "vae.")) for k in state)
    other = make_module()
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(1.0)
    other.load_state_dict(state)  # strict: only the frozen encoders may be missing
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ConfigError, match="tensors differ: model.blocks.1"):
        make_module(depth=2).on_load_checkpoint({"state_dict": state})


def test_generate_is_deterministic_per_image_and_guided():
    module = make_module().eval()
    for p in module.model.parameters():  # zero-initialised output layers would make every sample equal to the noise
        torch.nn.init.normal_(p, std=0.05)
    captions = ["a red circle in the centre", "a blue square at the top"]
    both = module.generate(captions, 16, 16, seeds=[3, 4])
    assert both.shape == (2, 3, 16, 16) and both.abs().max() <= 1
    torch.testing.assert_close(module.generate(captions[1:], 16, 16, seeds=[4])[0], both[1], atol=1e-4, rtol=1e-4)
    unguided = module.generate(captions, 16, 16, seeds=[3, 4], sampling=Sampling(cfg_scale=1.0))
    assert not torch.allclose(unguided, both)
    with pytest.raises(ConfigError, match="not divisible by 4"):
        module.generate(captions, 18, 16)


def test_mismatched_encoders_are_refused():
    backbone = Backbone(depth=1, hidden_size=32, num_heads=2, in_channels=4, caption_channels=32, token_num=24)
    with pytest.raises(ConfigError, match="in_channels=4"):
        DiffusionModule(backbone, TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace())
    backbone = Backbone(depth=1, hidden_size=32, num_heads=2, in_channels=3, caption_channels=32, token_num=24)
    with pytest.raises(ConfigError, match="token_num=24"):
        DiffusionModule(backbone, TinyT5TextEncoder(d_model=32, max_length=16), PixelSpace())
