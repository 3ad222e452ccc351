"""Exponential moving average of the trained network's weights, used for evaluation and sampling."""

from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


class EMA(Callback):
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` for ``pl_module.model`` (the trained backbone only:
    frozen encoders and teachers are never copied).

    The EMA weights are swapped into the model for validation, test and predict (``evaluate_with_ema``) and by
    ``ema.averaged(pl_module)`` for the sample logger. They are saved in the callback's checkpoint state, so a
    ``--ckpt_path`` resume continues the average and ``test``/``predict`` from a checkpoint sample from them;
    the checkpoint's ``state_dict`` keeps the raw trained weights.

    Args:
        decay: EMA decay per update.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after n updates, so early averages are not dominated by
            the random initialisation.
        every_n_steps: update every N optimizer steps.
        evaluate_with_ema: swap the EMA weights in for validation/test/predict.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, every_n_steps: int = 1,
                 evaluate_with_ema: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.evaluate_with_ema = evaluate_with_ema
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._swapped = False

    def _params(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return dict(pl_module.model.named_parameters())

    def _ensure_shadow(self, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        if not self.shadow:
            self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
            return
        if self.shadow.keys() != params.keys():
            raise ValueError("the EMA state in the checkpoint does not match this model's parameters; "
                             "resume with the config the checkpoint was trained with")
        self.shadow = {name: t.to(params[name].device) for name, t in self.shadow.items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_shadow(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = self._params(pl_module)
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        for name, ema in self.shadow.items():
            p = params[name]
            current = p.detach().clone()
            p.copy_(ema)
            ema.copy_(current)
        self._swapped = not self._swapped

    @contextmanager
    def averaged(self, pl_module: L.LightningModule):
        """Context in which ``pl_module.model`` holds the EMA weights (no-op if already swapped in or empty)."""
        swap = bool(self.shadow) and not self._swapped
        if swap:
            self._ensure_shadow(pl_module)
            self._swap(pl_module)
        try:
            yield
        finally:
            if swap:
                self._swap(pl_module)

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not self.evaluate_with_ema:
            return
        if not self.shadow:
            rank_zero_warn("EMA has no averaged weights yet (no training, no checkpoint); using the raw weights")
            return
        self._ensure_shadow(pl_module)
        self._swap(pl_module)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._swap_out(pl_module)

    def on_test_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_test_end(self, trainer, pl_module):
        self._swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_predict_end(self, trainer, pl_module):
        self._swap_out(pl_module)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.num_updates = state_dict["num_updates"]
        self.shadow = dict(state_dict["shadow"])
