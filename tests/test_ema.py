import torch
from torch import nn

from callbacks.ema import EMA


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 2)


class FakeTrainer:
    global_step = 0


def test_ema_average_swap_and_state():
    module = Holder()
    ema = EMA(decay=0.9, warmup=False)
    ema.on_fit_start(None, module)
    assert set(ema.shadow) == {"weight", "bias"}, "only the trained model is averaged"
    expected = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    trainer = FakeTrainer()
    for step in range(3):
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(1.0)
        trainer.global_step = step + 1
        ema.on_train_batch_end(trainer, module, None, None, step)
        for k, p in module.model.named_parameters():
            expected[k] = 0.9 * expected[k] + 0.1 * p.detach()
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k])

    raw = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    ema.on_test_start(None, module)
    torch.testing.assert_close(module.model.weight, expected["weight"])
    with ema.averaged(module):  # already swapped in: a no-op
        torch.testing.assert_close(module.model.weight, expected["weight"])
    ema.on_test_end(None, module)
    torch.testing.assert_close(module.model.weight, raw["weight"])

    restored = EMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.on_fit_start(None, module)
    assert restored.num_updates == 3
    torch.testing.assert_close(restored.shadow["bias"], expected["bias"])


def test_ema_warmup_tracks_early_weights():
    module = Holder()
    ema = EMA(decay=0.9999, warmup=True)
    ema.on_fit_start(None, module)
    with torch.no_grad():
        module.model.weight.add_(1.0)
    ema.on_train_batch_end(FakeTrainer(), module, None, None, 0)
    # first update uses decay min(0.9999, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow["weight"], module.model.weight.detach() - 0.1)


def test_frozen_parameters_are_not_shadowed_and_a_partial_average_loads():
    module = Holder()
    module.model.bias.requires_grad_(False)
    ema = EMA(decay=0.9, warmup=False)
    ema.on_fit_start(None, module)
    assert set(ema.shadow) == {"weight"}
    with torch.no_grad():
        module.model.weight.add_(1.0)
    ema.on_train_batch_end(FakeTrainer(), module, None, None, 0)
    state = ema.state_dict()
    assert set(state["shadow"]) == {"weight"}

    module.model.bias.requires_grad_(True)  # e.g. the exported student tested as a fully trainable model
    raw = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    restored = EMA()
    restored.load_state_dict(state)
    restored.on_test_start(None, module)
    torch.testing.assert_close(module.model.weight, state["shadow"]["weight"])
    torch.testing.assert_close(module.model.bias, raw["bias"])  # not averaged: its raw (frozen) value
    restored.on_test_end(None, module)
    torch.testing.assert_close(module.model.weight, raw["weight"])
